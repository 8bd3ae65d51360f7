"""Test-only ``count`` pool (``VEBAQ_FUNCTIONS=tests.counting_functions``) for fault tests.

Its function records, in the broker's Redis, how often it ran per event (:data:`RUNS`) and its
*effect* (:data:`EFFECTS`), written idempotently by event id the way a real function should make
its side effect (vROps' PUT/DELETE, a ticket keyed by the event id …). A short sleep gives a
``kill -9`` something to interrupt.
"""

from __future__ import annotations

import os
import time

import redis
from cloudevents.core.v1.event import CloudEvent

from workers.pools import function

#: Hash event id → number of runs of the function (more than 1: a redelivery ran it again).
RUNS = "vebaq-test:count:runs"
#: Hash event id → 1 once the effect happened; ``HSETNX`` returning 0 is a duplicate effect
#: that idempotency absorbed, counted in :data:`DUPLICATE_EFFECTS`.
EFFECTS = "vebaq-test:count:effects"
DUPLICATE_EFFECTS = "vebaq-test:count:duplicate-effects"
#: Seconds each run takes.
WORK = float(os.environ.get("VEBAQ_TEST_WORK", "0.005"))

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["VEBAQ_BROKER_URL"])
    return _client


@function(pool="count")
def count(event: CloudEvent) -> None:
    r = _redis()
    r.hincrby(RUNS, event.get_id(), 1)
    time.sleep(WORK)
    if not r.hsetnx(EFFECTS, event.get_id(), 1):
        r.incr(DUPLICATE_EFFECTS)
