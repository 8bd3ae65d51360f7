"""Logging that cannot leak a secret: every handler gets a filter that scrubs known secret values
and URL passwords from the final message."""

from __future__ import annotations

import logging
import sys

from vebaq.core.secrets import scrub

#: The format of the producer's and the CLI's log lines.
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class ScrubSecrets(logging.Filter):
    """Replaces secrets in a record's message (formatted with its args) by ``***``."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = scrub(text, self.secrets)
        return True


def install_scrubber(secrets: tuple[str, ...], logger: logging.Logger | None = None) -> None:
    """Add (or update) the scrubbing filter on every handler of ``logger`` (root by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        existing = [f for f in handler.filters if isinstance(f, ScrubSecrets)]
        if existing:
            existing[0].secrets = secrets
        else:
            handler.addFilter(ScrubSecrets(secrets))


def setup(level: str = "INFO", secrets: tuple[str, ...] = ()) -> None:
    """Log to stderr with :data:`FORMAT`, scrubbing ``secrets``."""
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr, force=True)
    install_scrubber(secrets)
