"""Progress of long operations (a backlog catch-up, a dead-letter or archive replay).

On a terminal: one live line redrawn in place. Anywhere else (a container log, a pipe): a
plain line every :data:`LOG_INTERVAL` seconds, so logs show progress without flooding.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL = 5.0
#: Seconds between two redraws on a terminal.
TTY_INTERVAL = 0.1


def bar(fraction: float, width: int = 24) -> str:
    """``[##########--------------]  42%``"""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}%"


class Progress:
    """Counts ``done`` of ``total`` items, shown as :func:`bar` plus a rate.

    :param label: what is progressing, e.g. ``"replaying dead letters"``.
    :param total: how many items there are; ``None`` when unknown beforehand (the caller then
        gives the ``fraction`` done, e.g. of a time range, with each update).
    :param stream: where to write (stderr by default).
    """

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._shown = self.started  # nothing shown for what finishes within one interval

    def line(self, done: int, fraction: float | None = None) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        if fraction is None:
            fraction = done / self.total if self.total else 1.0
        count = f"{done}/{self.total}" if self.total is not None else str(done)
        return f"{self.label} {bar(fraction)} {count} ({done / elapsed:.0f}/s)"

    def update(self, done: int, fraction: float | None = None) -> None:
        now = time.monotonic()
        if now - self._shown < (TTY_INTERVAL if self.tty else LOG_INTERVAL):
            return
        self._shown = now
        if self.tty:
            self.stream.write("\r" + self.line(done, fraction))
        else:
            self.stream.write(self.line(done, fraction) + "\n")
        self.stream.flush()

    def finish(self, done: int, fraction: float | None = None) -> None:
        """The final state, if any progress was shown at all."""
        if self._shown > self.started:
            self.stream.write(("\r" if self.tty else "") + self.line(done, fraction) + "\n")
            self.stream.flush()
