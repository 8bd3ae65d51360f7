"""Enqueueing task messages in pipelined batches.

A batch is sent through one kombu producer inside ``Producer.batch()``, which kombu's Redis
transport turns into one pipelined round trip per :data:`PIPELINE_SIZE` commands instead of one
``LPUSH`` each. :meth:`Publisher.publish` returns only after Redis answered for every message:
that is the confirmation a checkpoint (or a released retry, or a removed dead letter) waits for.

kombu's pipeline is not a transaction: if the connection breaks during a flush, Redis may have
taken some of the batch. That is fine where the caller sends the whole batch again (workers
suppress the duplicates by event id), but not where the sender must be told "all or nothing":
``publish(..., atomic=True)`` (``vebaq ingress``) sends the batch as one ``MULTI``/``EXEC``
transaction, which Redis applies whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from celery import Celery
from kombu import Producer

from vebaq.core.messages import TaskMessage, queue_for

#: kombu flushes its pipeline after this many commands, bounding memory for huge backlogs.
PIPELINE_SIZE = 500

#: Publish retries inside kombu before a batch is given up (and kept by the caller).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}

#: Redis commands kombu buffers per task message at most (``LPUSH``, the task-sent event's
#: ``PUBLISH``, a queue's ``PEXPIRE``): an atomic batch is sized so that it never flushes early.
COMMANDS_PER_MESSAGE = 3


def _make_transactional(producer: Producer) -> None:
    """Turn the producer's active publish batch into a ``MULTI``/``EXEC`` transaction.

    kombu (≥ 5.7) buffers a batch in a redis-py pipeline created with ``transaction=False``;
    redis-py reads that flag when the pipeline runs, so setting it before the flush is enough.
    Raises ``RuntimeError`` when kombu's batch is not what this expects (the batch is then
    discarded, nothing sent) rather than silently sending a partial batch."""
    state = getattr(getattr(producer, "_batch_local", None), "current", None)
    pipeline = getattr(getattr(state, "session", None), "pipeline", None)
    if pipeline is None or not hasattr(pipeline, "transaction"):
        raise RuntimeError("cannot publish atomically: kombu's publish batch is not a redis-py "
                           "pipeline (kombu changed, or the transport does not batch)")
    pipeline.transaction = True


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

    def publish(self, messages: Sequence[TaskMessage], atomic: bool = False) -> int:
        """Enqueue every message; returns how many were sent.

        Raises kombu/redis errors if Redis did not take them all; the caller keeps the batch and
        sends it again later (workers suppress duplicates by event id and function).

        :param atomic: send the batch as one Redis transaction: on an error Redis took none of
            it (the batch must fit in memory; ``vebaq ingress`` bounds it by its request size).
        """
        if not messages:
            return 0
        self.declare(m.pool for m in messages)
        size = COMMANDS_PER_MESSAGE * len(messages) + 1 if atomic else PIPELINE_SIZE
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=size):
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
            if atomic:
                _make_transactional(producer)
        return len(messages)
