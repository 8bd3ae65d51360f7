"""Enqueueing CloudEvents as Celery tasks named after their subject, one per matching pool.

A batch of events is sent through one kombu producer inside ``Producer.batch()``, which kombu's
Redis transport turns into one pipelined round trip per batch instead of one ``LPUSH`` each. The
call returns only after Redis answered for every message: that is the confirmation the
checkpoint waits for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery

from workers.app import queue_for

#: kombu flushes its pipeline after this many commands, bounding memory for huge backlogs.
PIPELINE_SIZE = 500

#: Publish retries inside kombu before a batch is given up and kept for the next attempt.
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}


@dataclass(frozen=True)
class Outgoing:
    """One converted event and where it goes.

    :param structured: the CloudEvent in structured JSON form (the task's ``event`` argument).
    :param pools: the pools whose triggers matched.
    """

    subject: str
    event_id: str
    structured: dict[str, Any]
    pools: tuple[str, ...]


def kwargs_summary(item: Outgoing, pool: str) -> str:
    """A short view of the task's arguments for Flower: the pool and the event's identity."""
    event = item.structured
    host = (event.get("data") or {}).get("Host") or {}
    summary = {"pool": pool, "event": {"id": item.event_id, "subject": item.subject,
                                       "time": event.get("time"), "source": event.get("source")}}
    if isinstance(host, dict) and host.get("Name"):
        summary["event"]["host"] = host["Name"]
    return repr(summary)


def task_id(event_id: str, pool: str) -> str:
    """One task per (event, pool); Flower shows the CloudEvent id in it."""
    return f"{event_id}:{pool}"


class Publisher:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self._declared: set[str] = set()

    def declare(self, pools: set[str] | list[str]) -> None:
        """Create the pools' queue bindings, so messages sent before a worker ever started
        are routed and kept."""
        missing = [p for p in pools if p not in self._declared]
        if not missing:
            return
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for pool in missing:
                queue_for(pool)(channel).declare()
                self._declared.add(pool)

    def publish(self, batch: list[Outgoing]) -> int:
        """Enqueue every (event, pool) task of ``batch``; returns the number of tasks sent.

        Raises kombu/redis errors if Redis did not take them all; the caller keeps the batch
        and retries it later (tasks are de-duplicated by id on the worker side)."""
        self.declare({pool for item in batch for pool in item.pools})
        sent = 0
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
            for item in batch:
                for pool in item.pools:
                    self.app.send_task(
                        item.subject,
                        kwargs={"event": item.structured, "pool": pool},
                        task_id=task_id(item.event_id, pool),
                        queue=queue_for(pool),
                        declare=[],  # declared once, above: not once per message
                        producer=producer,
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                        # What Flower shows as the arguments; Celery would otherwise render
                        # the whole event for every message (the costliest part of a send).
                        argsrepr="()",
                        kwargsrepr=kwargs_summary(item, pool),
                    )
                    sent += 1
        return sent
