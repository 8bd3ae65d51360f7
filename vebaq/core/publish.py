"""Enqueueing task messages in pipelined batches.

A batch is sent through one kombu producer inside ``Producer.batch()``, which kombu's Redis
transport turns into one pipelined round trip per :data:`PIPELINE_SIZE` commands instead of one
``LPUSH`` each. :meth:`Publisher.publish` returns only after Redis answered for every message:
that is the confirmation a checkpoint (or a released retry, or a removed dead letter) waits for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from celery import Celery

from vebaq.core.messages import TaskMessage, queue_for

#: kombu flushes its pipeline after this many commands, bounding memory for huge backlogs.
PIPELINE_SIZE = 500

#: Publish retries inside kombu before a batch is given up (and kept by the caller).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}


class Publisher:
    """Sends :class:`~vebaq.core.messages.TaskMessage` batches with ``app``."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._declared: set[str] = set()

    def declare(self, pools: Iterable[str]) -> None:
        """Create the pools' queue bindings, so messages sent before a worker ever started
        are routed and kept."""
        missing = [p for p in dict.fromkeys(pools) if p not in self._declared]
        if not missing:
            return
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for pool in missing:
                queue_for(pool)(channel).declare()
                self._declared.add(pool)

    def publish(self, messages: Sequence[TaskMessage]) -> int:
        """Enqueue every message; returns how many were sent.

        Raises kombu/redis errors if Redis did not take them all; the caller keeps the batch and
        sends it again later (workers suppress duplicates by event id and function)."""
        if not messages:
            return 0
        self.declare(m.pool for m in messages)
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
            for message in messages:
                self.app.send_task(
                    message.subject,
                    kwargs=message.kwargs(),
                    task_id=message.task_id,
                    queue=queue_for(message.pool),
                    declare=[],  # declared once, above: not once per message
                    producer=producer,
                    retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY,
                    argsrepr="()",
                    kwargsrepr=message.summary(),
                )
        return len(messages)
