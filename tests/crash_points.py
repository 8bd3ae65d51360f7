"""Test-only: kills the producer with SIGKILL (as ``kill -9`` does) right before or right after
it archives a batch — the two crash windows of :mod:`vebaq.core.archive`'s guarantee.

The producer imports it as a function module (``VEBAQ_FUNCTIONS=tests.crash_points``) with
``VEBAQ_TEST_CRASH=before-archive`` or ``after-archive``; it kills only the first producer that
gets there (a flag in the broker's Redis), so the restarted one runs on.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from vebaq.core.archive import Appended, Archive

#: Set (to the crash point) by the producer that crashed.
CRASHED = "vebaq-test:crashed"
POINT = os.environ.get("VEBAQ_TEST_CRASH")

if POINT in ("before-archive", "after-archive"):
    _append = Archive.append

    def append(self: Archive, *args: Any, **kwargs: Any) -> Appended:
        crash = bool(self.redis.set(CRASHED, POINT, nx=True))
        if crash and POINT == "before-archive":
            os.kill(os.getpid(), signal.SIGKILL)
        result = _append(self, *args, **kwargs)
        if crash and POINT == "after-archive":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Archive.append = append  # type: ignore[method-assign]
