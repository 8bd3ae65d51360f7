"""A running worker that consumes its queue only while it is being measured.

Pausing uses Celery's remote control (``cancel_consumer`` / ``add_consumer``, broadcast over the
broker's database only), so several workers can run side by side and take turns: worker startup
is never timed, and repeats of different workers alternate, which spreads a noisy machine's
drift over all of them.
"""

from __future__ import annotations

import re
import time
from typing import Any

import redis
from celery import Celery

from bench import redisdb
from tests.support import Proc

#: Seconds to wait for a remote-control reply, and how often to ask: a broadcast is Redis
#: pub/sub, lost if the worker has not subscribed yet (just after "ready.").
CONTROL_TIMEOUT = 5.0
CONTROL_ATTEMPTS = 4

#: Slowest drain rate (messages/s) tolerated before a run is abandoned.
MIN_RATE = 10.0

#: Seconds a paused worker keeps listening: kombu's Redis transport has a ``BRPOP`` in flight
#: (``brpop_timeout``, 1 s) when the consumer is cancelled, and that ``BRPOP`` would still take
#: the next message published — which the paused worker then hands back to the queue, late.
PAUSE_SETTLE = 1.2


class PausedWorker:
    """``proc``, a worker named ``node`` consuming ``queue``, paused from the start.

    :param app: any app on the same broker (remote control only needs the broker).
    """

    def __init__(self, label: str, proc: Proc, app: Celery, queue: str, node: str) -> None:
        self.label = label
        self.proc = proc
        self.app = app
        self.queue = queue
        self.node = node
        self.pause()

    def _control(self, command: str, *args: Any, **kwargs: Any) -> None:
        method = getattr(self.app.control, command)
        for _ in range(CONTROL_ATTEMPTS):  # the commands are idempotent
            if method(*args, destination=[self.node], reply=True, timeout=CONTROL_TIMEOUT,
                      **kwargs):
                return
        raise RuntimeError(f"{self.node} did not answer {command} "
                           f"({CONTROL_ATTEMPTS} x {CONTROL_TIMEOUT:g}s)")

    def resume(self) -> None:
        self._control("add_consumer", self.queue, exchange=self.queue, exchange_type="direct",
                      routing_key=self.queue)

    def pause(self) -> None:
        """Stop consuming; returns once no ``BRPOP`` of this worker can take a message."""
        self._control("cancel_consumer", self.queue)
        time.sleep(PAUSE_SETTLE)

    def drain(self, r: redis.Redis, total: int, started: float | None = None) -> redisdb.Drain:
        """Resume, wait until the ``total`` messages waiting are done, pause again.

        :param started: when the clock starts; by default when the worker takes the first."""
        self.resume()
        try:
            return redisdb.wait_drained(r, self.queue, total, timeout=60 + total / MIN_RATE,
                                        started=started)
        finally:
            self.pause()

    def count(self, pattern: str) -> int:
        """How often ``pattern`` occurs in the worker's log."""
        return len(re.findall(pattern, self.proc.log()))
