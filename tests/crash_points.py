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

if POINT in ("after-throttle-decision", "before-throttle-settle"):
    # The crash windows of vebaq.core.throttle's guarantee, at the first batch of events whose
    # decisions filled a batch: decided (state and memo written) but nothing enqueued; or
    # enqueued and checkpointed but the decisions not yet settled.
    from vebaq.core.throttle import FIRED, ThrottleStore

    _decide, _settle = ThrottleStore.decide, ThrottleStore.settle

    def decide(self: ThrottleStore, candidates: Any) -> list[str]:
        decisions = _decide(self, candidates)
        if POINT == "after-throttle-decision" and FIRED in decisions and \
                self.redis.set(CRASHED, POINT, nx=True):
            os.kill(os.getpid(), signal.SIGKILL)
        return decisions

    def settle(self: ThrottleStore, candidates: Any, batches: Any) -> None:
        batches = list(batches)
        if POINT == "before-throttle-settle" and batches and \
                self.redis.set(CRASHED, POINT, nx=True):
            os.kill(os.getpid(), signal.SIGKILL)
        _settle(self, candidates, batches)

    ThrottleStore.decide = decide  # type: ignore[method-assign]
    ThrottleStore.settle = settle  # type: ignore[method-assign]
