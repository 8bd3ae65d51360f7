"""HTTP failures of functions that call other services (vROps, an HTTP pool's sink), as the
retry policy and the dead letters read them.

* :class:`HttpFailure` carries where (the URL, password hidden), the status and a short body,
  and offers them as Knative's dead-letter extensions (``knative_error_attributes()``, read by
  :mod:`vebaq.core.deadletters`);
* :func:`retryable` is the one rule for which answers are worth retrying: none at all (a
  connection error, a timeout), ``408``, ``429`` and every ``5xx``; any other ``4xx`` is
  permanent;
* :func:`parse_retry_after` reads a server's ``Retry-After`` (the retry policy honours it via
  an exception's ``retry_after``, capped by ``maxRetryAfter``), and :func:`short_body` keeps an
  error body on one line, bounded, with secrets masked.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from vebaq.core.secrets import scrub

#: Statuses worth retrying (besides every 5xx).
RETRYABLE_STATUSES = frozenset({408, 429})

#: Longest error body kept in exceptions and dead letters by default, in characters.
MAX_ERROR_BODY = 200


def retryable(status: int | None) -> bool:
    """No answer, 408, 429 or 5xx: a later attempt may succeed."""
    return status is None or status >= 500 or status in RETRYABLE_STATUSES


class HttpFailure(Exception):
    """Common part of an HTTP call's failures: where, what status, what body.

    :param url: the URL called, with any password already hidden.
    :param retry_after: seconds the server asked us to wait, if it said (``Retry-After``).
    """

    def __init__(self, message: str, *, url: str, status: int | None = None,
                 body: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body
        self.retry_after = retry_after

    def knative_error_attributes(self) -> dict[str, str]:
        """The CloudEvent extensions a Knative dead-letter sink would add; like Knative, the
        code and data are left out when there was no answer. ``knativeerrordata`` is the short
        body as text (Knative base64-encodes it)."""
        attributes = {"knativeerrordest": self.url}
        if self.status is not None:
            attributes["knativeerrorcode"] = str(self.status)
        if self.body:
            attributes["knativeerrordata"] = self.body
        return attributes


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); ``None`` if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def short_body(text: str, secrets: tuple[str, ...] = (), limit: int = MAX_ERROR_BODY) -> str:
    """An error body on one line, secrets masked, at most ``limit`` characters."""
    text = scrub(" ".join(text.split()), secrets)
    return text if len(text) <= limit else text[:limit - 1] + "…"
