"""Values that must never reach a log line, a repr, an exception message or a task argument."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

#: What a secret looks like wherever it is shown.
MASK = "***"


class Secret:
    """A string that hides itself.

    ``str()``, ``repr()`` and f-strings all print :data:`MASK`; only :meth:`reveal` gives the
    value, so a secret can only leak through code that asks for it by name.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK


def redact_url(url: str) -> str:
    """``redis://:pw@host:6379/0`` → ``redis://:***@host:6379/0``; URLs without a password are
    returned unchanged. A Sentinel URL's ``;``-separated alternatives are redacted each."""
    if ";" in url and url.strip().lower().startswith("sentinel://"):
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]  # not .port: it raises on a malformed port
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


#: Longest user name and password :func:`scrub` recognises in a URL, in characters. Bounded so
#: that scrubbing stays linear in the text's length whatever the text (a 1 MiB token without
#: white space included): an unbounded pattern tried at every position is quadratic.
MAX_URL_USER = 256
MAX_URL_PASSWORD = 1024

# ``user:password@`` right after a ``scheme://`` (the user has no colon; neither has '/' or '@').
_USERINFO = re.compile(rf"[^:/@\s]{{0,{MAX_URL_USER}}}:[^@/\s]{{1,{MAX_URL_PASSWORD}}}@")
_SCHEME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")


def _has_scheme_before(text: str, end: int) -> bool:
    """Is ``text[:end]`` ending in a URL scheme (a letter, then letters, digits, ``+.-``)?"""
    start = end
    while start > 0 and end - start < 32 and text[start - 1] in _SCHEME_CHARACTERS:
        start -= 1
    return any(c.isalpha() for c in text[start:end])


def _mask_url_passwords(text: str) -> str:
    parts, done = [], 0
    found = text.find("://")
    while found != -1:
        after = found + 3
        match = _USERINFO.match(text, after)
        if match and _has_scheme_before(text, found):
            colon = text.index(":", after)
            parts += [text[done:colon + 1], MASK]
            done = match.end() - 1  # keep the '@'
            after = match.end()
        found = text.find("://", after)
    return "".join(parts) + text[done:] if parts else text


def scrub(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Remove known secret values and URL passwords from free text (log lines, error messages).

    Linear in the length of ``text``: it runs on every log line, event text included."""
    for value in secrets:
        if value and len(value) >= 3:
            text = text.replace(value, MASK)
    return _mask_url_passwords(text)
