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
    returned unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]  # not .port: it raises on a malformed port
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.I)


def scrub(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Remove known secret values and URL passwords from free text (log lines, error messages)."""
    for value in secrets:
        if value and len(value) >= 3:
            text = text.replace(value, MASK)
    return _URL_CREDENTIALS.sub(rf"\g<scheme>\g<user>:{MASK}@", text)
