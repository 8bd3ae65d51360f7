"""The practical ceiling: the producer's real task messages pushed with redis-py pipelines
(``LPUSH``, one per message, in pipelines of the publisher's batch size) and popped one
``BRPOP`` at a time (as a worker takes them); and :class:`~vebaq.core.publish.Publisher`
publishing the same task messages (built from prepared ``TaskMessage``\\ s, task-sent events on,
as the producer sends them) against that push, in the same repeat."""

from __future__ import annotations

import time
from typing import Any

import redis

from bench import events, redisdb
from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from vebaq.core.messages import TaskMessage
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


def publish(publisher: Publisher, messages: list[TaskMessage]) -> float:
    """Seconds for :meth:`Publisher.publish` to send ``messages`` (queues declared before)."""
    started = time.perf_counter()
    publisher.publish(messages)
    return time.perf_counter() - started


def measure(profile: Profile, redis_url: str) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    messages = sample_messages(r, redis_url)
    count = profile.raw_messages
    app = create_app(broker_url=redis_url)
    publisher = Publisher(app)
    # Distinct events, as a backlog has (the publisher encodes each event once per batch).
    tasks = events.outgoing(events.simulated_cloudevents(count), "echo")
    pushes, pops, publishes = [], [], []

    def push_and_pop() -> None:
        pushes.append(count / push(r, messages, count))
        pops.append(count / pop(r, count))

    def publish_all() -> None:
        publisher._declared.clear()  # the database was flushed: declare the queue again
        publisher.declare(["echo"])
        publishes.append(count / publish(publisher, tasks))

    for repeat in range(profile.repeats):
        for step in (push_and_pop, publish_all) if repeat % 2 == 0 else (publish_all,
                                                                           push_and_pop):
            redisdb.flush(r)
            step()
    redisdb.flush(r)
    return {
        "messages": count,
        "message_bytes": round(sum(map(len, messages)) / len(messages)),
        "task_sent_events": bool(app.conf.task_send_sent_event),
        "push_per_s": summary(pushes),
        "pop_per_s": summary(pops),
        "publish_per_s": summary(publishes),
        "ratio_publish_to_push": paired_ratio(publishes, pushes),
    }
