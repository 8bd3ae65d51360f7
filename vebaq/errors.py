"""Errors that end a command with one clear line (see :func:`vebaq.cli.main`)."""

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters (newlines from a YAML key, say) shown escaped."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class VebaqError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""

    #: Process exit status for this kind of error.
    exit_code = 1


class ConfigError(VebaqError):
    """The configuration file or environment is invalid; the message names the key."""

    exit_code = 2


class VCenterError(VebaqError):
    """vCenter is unreachable, refused the login, or answered something unusable."""

    exit_code = 3


class BrokerError(VebaqError):
    """The Redis broker is unreachable or refused the connection."""

    exit_code = 4
