"""Taking messages off a queue: vebaq's atomic fetch (:mod:`vebaq.core.transport`: one Lua
script pops a message and records it as unacked) against kombu's stock Redis transport
(``BRPOP``, then a pipeline recording it), on the same Redis, in every repeat (the order
alternates, so drift on a noisy machine hits both alike).

Each run preloads :data:`MESSAGES` task-sized messages (the producer's ``Publisher`` makes the
same size: ~2 KiB of JSON with a base64 body) into a queue and times one consumer taking and
acking all of them (``drain_events``, prefetch 1, as a worker's consumer does), so the figure is
the transport's own cost per message, without a task running.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from vebaq.core import transport

#: Messages per run.
MESSAGES = 3_000
#: Bytes of each message's body (before base64): about a CloudEvent of a host event.
BODY_BYTES = 1_500
#: The queue's name.
QUEUE = "bench-fetch"


def _preload(url: str) -> None:
    body = json.dumps({"data": base64.b64encode(b"x" * BODY_BYTES).decode()})
    queue = Queue(QUEUE, Exchange(QUEUE, "direct"), routing_key=QUEUE)
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        producer.publish(body, exchange=QUEUE, routing_key=QUEUE, declare=[queue])
        for _ in range(MESSAGES - 1):
            producer.publish(body, exchange=QUEUE, routing_key=QUEUE)


def _consume(url: str, transport_cls: type) -> float:
    """Seconds one consumer takes to take and ack the whole queue."""
    taken = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal taken
        taken += 1
        message.ack()

    queue = Queue(QUEUE, Exchange(QUEUE, "direct"), routing_key=QUEUE)
    with (Connection(url, transport=transport_cls,
                     transport_options={"priority_steps": [0]}) as conn,
          conn.Consumer([queue], callbacks=[on_message], prefetch_count=1)):
        started = time.perf_counter()
        while taken < MESSAGES:
            conn.drain_events(timeout=10)
        return time.perf_counter() - started


def measure(profile: Profile, redis_url: str) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url)
    transports = {"kombu": kombu_redis.Transport, "vebaq": transport.Transport}
    rates: dict[str, list[float]] = {name: [] for name in transports}
    for repeat in range(profile.repeats):
        order = list(transports) if repeat % 2 == 0 else list(reversed(transports))
        for name in order:
            r.delete(QUEUE, "unacked", "unacked_index")
            _preload(redis_url)
            rates[name].append(MESSAGES / _consume(redis_url, transports[name]))
            assert r.llen(QUEUE) == 0 and r.hlen("unacked") == 0, "every message taken and acked"
    return {"messages": MESSAGES,
            "per_s": {name: summary(values) for name, values in rates.items()},
            "ratio_vebaq_to_kombu": paired_ratio(rates["vebaq"], rates["kombu"])}
