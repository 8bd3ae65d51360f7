"""The benchmark's Redis database: connecting, flushing, and watching a queue drain.

Celery's Redis transport keeps a queue as a list named after it and, with late acks, every
delivered but unacknowledged message in the hash :data:`UNACKED` until the task finished. A
queue is *drained* when both are empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

#: kombu's hash of delivered, not yet acknowledged messages (its default ``unacked_key``).
UNACKED = "unacked"

#: Seconds between two looks at the queue while it drains (the timing resolution).
POLL = 0.005

#: A drained queue must stay empty this long, so that a message between ``BRPOP`` and its
#: unacked record is never mistaken for the end.
SETTLE = 0.03


def connect(url: str) -> redis.Redis:
    """A client of ``url``; refuses any database but the benchmark's own (13 by default)."""
    db = urlsplit(url).path.lstrip("/") or "0"
    if db in ("0", "9"):
        raise SystemExit(f"bench: refusing Redis database {db}: it belongs to others "
                         f"(use VEBAQ_BENCH_REDIS_URL=redis://…/13)")
    return redis.Redis.from_url(url, socket_timeout=30)


def flush(r: redis.Redis) -> None:
    """Empty the benchmark's database (only that one)."""
    r.flushdb()


def in_flight(r: redis.Redis, queue: str) -> tuple[int, int]:
    """``(waiting, unacked)`` messages of ``queue``'s transport."""
    waiting, unacked = r.pipeline(transaction=False).llen(queue).hlen(UNACKED).execute()
    return int(waiting), int(unacked)


@dataclass(frozen=True)
class Drain:
    """When a preloaded queue started and finished draining (``time.perf_counter()``)."""

    started: float
    finished: float

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def wait_drained(r: redis.Redis, queue: str, total: int, timeout: float,
                 started: float | None = None) -> Drain:
    """Wait until ``queue`` (holding ``total`` messages) is empty and nothing is unacked.

    :param started: when draining began; by default the first look that finds fewer than
        ``total`` messages waiting (a worker took one).
    """
    deadline = time.monotonic() + timeout
    empty_since: float | None = None
    while True:
        waiting, unacked = in_flight(r, queue)
        now = time.perf_counter()
        if started is None and waiting < total:
            started = now
        if waiting == 0 and unacked == 0 and started is not None:
            if empty_since is None:
                empty_since = now
            elif now - empty_since >= SETTLE:
                return Drain(started, empty_since)
        else:
            empty_since = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue {queue!r} not drained after {timeout:.0f}s "
                               f"({waiting} waiting, {unacked} unacked of {total})")
        time.sleep(POLL)
