"""Logging that cannot leak a secret: every handler gets a filter that scrubs known secret values
and URL passwords from the final message.

A thread may label its lines (:func:`label_thread`): a producer reading several vCenters runs
one thread per vCenter, and each line then starts with ``[<vCenter>]``."""

from __future__ import annotations

import logging
import sys
import threading

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


_thread = threading.local()


def label_thread(label: str | None) -> None:
    """Start every line the calling thread logs from now on with ``[label]`` (``None``: stop)."""
    _thread.label = label


class ThreadLabel(logging.Filter):
    """Prefixes a record with the label of the thread that logs it (filters run in that
    thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        label = getattr(_thread, "label", None)
        if label and not getattr(record, "vebaq_labelled", False):
            record.msg, record.args = f"[{label}] {record.getMessage()}", None
            record.vebaq_labelled = True
        return True


def install_scrubber(secrets: tuple[str, ...], logger: logging.Logger | None = None) -> None:
    """Add (or update) the scrubbing filter on every handler of ``logger`` (root by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, ThreadLabel) for f in handler.filters):
            handler.addFilter(ThreadLabel())
        existing = [f for f in handler.filters if isinstance(f, ScrubSecrets)]
        if existing:
            existing[0].secrets = secrets
        else:
            handler.addFilter(ScrubSecrets(secrets))


def setup(level: str = "INFO", secrets: tuple[str, ...] = ()) -> None:
    """Log to stderr with :data:`FORMAT`, scrubbing ``secrets``."""
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr, force=True)
    install_scrubber(secrets)
