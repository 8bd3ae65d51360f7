"""The practical ceiling: the producer's real task messages pushed with redis-py pipelines
(``LPUSH``, as kombu sends them) and popped one ``BRPOP`` at a time (as a worker takes them)."""

from __future__ import annotations

import time
from typing import Any

import redis

from bench import events, redisdb
from bench.profiles import Profile
from bench.stats import summary
from vebaq.core.publish import PIPELINE_SIZE, Publisher
from workers.app import create_app

#: The queue the raw messages go through.
QUEUE = "bench-raw"

#: Distinct real messages sampled from the producer (cycled through when pushing).
SAMPLE = 200


def sample_messages(r: redis.Redis, redis_url: str) -> list[bytes]:
    """Task messages exactly as the producer enqueues them for the echo pool."""
    redisdb.flush(r)
    Publisher(create_app(broker_url=redis_url)).publish(
        events.outgoing(events.simulated_cloudevents(SAMPLE), "echo"))
    messages = r.lrange("echo", 0, -1)
    redisdb.flush(r)
    return messages


def push(r: redis.Redis, messages: list[bytes], count: int) -> float:
    """Seconds to ``LPUSH`` ``count`` messages in pipelines of the publisher's batch size."""
    started = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        pipe.lpush(QUEUE, messages[i % len(messages)])
        if len(pipe) >= PIPELINE_SIZE:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - started


def pop(r: redis.Redis, count: int) -> float:
    """Seconds to take ``count`` messages one ``BRPOP`` (one round trip) each."""
    started = time.perf_counter()
    for _ in range(count):
        if r.brpop([QUEUE], timeout=5) is None:
            raise RuntimeError(f"{QUEUE} ran empty early")
    return time.perf_counter() - started


def measure(profile: Profile, redis_url: str) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    messages = sample_messages(r, redis_url)
    count = profile.raw_messages
    pushes, pops = [], []
    for _ in range(profile.repeats):
        redisdb.flush(r)
        pushes.append(count / push(r, messages, count))
        pops.append(count / pop(r, count))
    redisdb.flush(r)
    return {
        "messages": count,
        "message_bytes": round(sum(map(len, messages)) / len(messages)),
        "push_per_s": summary(pushes),
        "pop_per_s": summary(pops),
    }
