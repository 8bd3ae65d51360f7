"""One error tree for vebaq.

Two families, because they mean different things:

* :class:`VebaqError` — something the *user* must fix (configuration, credentials, an
  unreachable host); a command ends with its message as one line and its exit status, never a
  traceback (see :func:`error_line`).
* :class:`PermanentError` — a function's failure that retrying cannot fix; the event goes to the
  dead letters at once. :class:`PoisonMessage` is the special case of a task message that is
  itself unusable (:class:`EventTooLarge` one of its kinds), :class:`WorkerLost` the case of a
  function that keeps killing the worker running it. Any other exception from a function is
  retried.
"""

from __future__ import annotations

import re

from vebaq.core.secrets import scrub

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, width: int | None = None) -> str:
    """``text`` on one line: control characters (a newline from a YAML key, say) shown escaped;
    with ``width``, runs of white space folded and the text cut to that many characters."""
    text = _CONTROL.sub(lambda match: repr(match.group())[1:-1], str(text)) if width is None \
        else " ".join(str(text).split())
    if width is not None and len(text) > width:
        return text[:width - 1] + "…"
    return text


def error_line(message: str, secrets: tuple[str, ...] = ()) -> str:
    """How every error ends a command: one line, no secret, no URL password."""
    return f"vebaq: error: {one_line(scrub(str(message), secrets))}"


class VebaqError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""

    #: Process exit status for this kind of error.
    exit_code = 1


class ConfigError(VebaqError):
    """The configuration file or environment is invalid; the message names the key."""

    exit_code = 2


class BadOption(VebaqError):
    """A command-line option is invalid; the message names it."""

    exit_code = 2


class VCenterError(VebaqError):
    """vCenter is unreachable, refused the login, or answered something unusable."""

    exit_code = 3


class LoginRefused(VCenterError):
    """vCenter refused the user name or password (retrying soon would risk an SSO lockout)."""


class BrokerError(VebaqError):
    """The Redis broker is unreachable or refused the connection."""

    exit_code = 4


class NoSuchDeadLetter(VebaqError):
    """No dead letter has this id (already replayed or purged, or mistyped)."""


class NotReplayable(VebaqError):
    """The dead letter has no event or no pool to send it to."""


class PermanentError(Exception):
    """Retrying cannot help (bad request, unknown resource, malformed event): the event goes
    straight to the dead letters with this message as the reason."""


class PoisonMessage(PermanentError):
    """The task message itself is unusable: undecodable, not a CloudEvent, unknown pool."""


class EventTooLarge(PoisonMessage):
    """The task's CloudEvent is larger than its pool's ``maxEventBytes``: dead-lettered without
    running a function (bounded work per event)."""


class WorkerLost(PermanentError):
    """The worker running a function died again and again for the same task (``kill -9``,
    ``os._exit``, the OOM killer): the poison breaker dead-letters the function instead of
    letting the task be redelivered for ever."""


class SoftTimeLimit(Exception):
    """A function ran past its pool's soft time limit (``softTimeLimit``) and was interrupted:
    an ordinary failure, retried with back-off."""


class HardTimeLimit(PermanentError):
    """A task ran past its pool's hard time limit (``timeLimit``): Celery killed the pool child
    running it, and the event is dead-lettered."""
