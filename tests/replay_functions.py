"""Test-only ``audit`` pool (``VEBAQ_FUNCTIONS=tests.replay_functions``): a function "added
later", for the replay tests. Each run appends the event's id, subject and whether it was a
replay to :data:`RUNS` in the broker's Redis, in the order the runs happen."""

from __future__ import annotations

import json
import os

import redis
from cloudevents.core.v1.event import CloudEvent

from workers.pools import function

#: List of JSON ``{"id", "subject", "replayed"}``, one per run, in run order.
RUNS = "vebaq-test:audit:runs"

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["VEBAQ_BROKER_URL"])
    return _client


@function(pool="audit")
def audit(event: CloudEvent) -> None:
    _redis().rpush(RUNS, json.dumps({"id": event.get_id(), "subject": event.get_subject(),
                                     "replayed": event.get_extension("replayed") is True}))


def runs(r: redis.Redis) -> list[dict]:
    return [json.loads(raw) for raw in r.lrange(RUNS, 0, -1)]
