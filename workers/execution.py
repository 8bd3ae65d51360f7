"""What every event task does: validate the message, run the pool's functions once each.

A message follows the task message contract (:mod:`vebaq.core.messages`). For each function of
the pool that handles the event's subject:

1. skip it if its done marker says it already ran for this event id (redelivery, overlap) — for
   a forced replay (``force``), only if that very replay already ran it (:mod:`vebaq.core.done`);
2. run it; on success set the done marker;
3. on failure hand over to :mod:`workers.retries`, which schedules a durable retry of the
   functions that failed, or dead-letters them, and then raises what ends the task (RETRY or
   FAILURE in Flower).

Bad messages (not a CloudEvent, no or unknown pool) are dead-lettered at once: retrying them
would only fail again, and dropping them would lose them. When Redis cannot take vebaq's own
bookkeeping (done markers, a retry, a dead letter), the message is rejected back to its queue
instead of being acked and lost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from cloudevents.core.v1.event import CloudEvent

from vebaq.core import done
from vebaq.core.deadletters import describe
from vebaq.core.envelope import from_structured
from vebaq.core.errors import PermanentError, PoisonMessage
from vebaq.core.messages import TaskMessage
from vebaq.core.redisdb import client
from workers import retries
from workers.pools import POOLS, functions_for

logger = logging.getLogger("vebaq.worker")


def parse_message(subject: str, kwargs: Mapping[str, Any],
                  args: tuple[Any, ...] = ()) -> tuple[TaskMessage, CloudEvent]:
    """Validate a task call; raises :class:`PoisonMessage` saying what is wrong."""
    if args:
        raise PoisonMessage(f"a vebaq task takes keyword arguments only, got {len(args)} "
                            "positional argument(s)")
    message = TaskMessage.parse(subject, kwargs)
    if message.pool not in POOLS:
        raise PoisonMessage(f"unknown pool {message.pool!r} "
                            f"(this worker knows {', '.join(sorted(POOLS))})")
    try:
        cloudevent = from_structured(dict(message.event))
    except ValueError as exc:
        raise PoisonMessage(f"invalid CloudEvent: {exc}") from None
    return message, cloudevent


def handle(task: Task, kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Run the functions; returns a small summary (shown as the task result in Flower), or
    raises :class:`~workers.retries.DeadLettered` or :class:`celery.exceptions.Retry`."""
    try:
        return _handle(task, kwargs, args)
    except redis.RedisError as exc:
        raise Reject(f"Redis failed ({type(exc).__name__}: {exc}); message requeued",
                     requeue=True) from exc


def _handle(task: Task, kwargs: Mapping[str, Any], args: tuple[Any, ...]) -> dict[str, Any]:
    redis_client = client(task.app.conf.broker_url)
    try:
        message, cloudevent = parse_message(task.name, kwargs, args)
    except PoisonMessage as exc:
        letter = retries.dead_letter(task, redis_client, kwargs.get("event"), kwargs.get("pool"),
                                     function=None, error=exc, attempt=1)
        raise retries.DeadLettered(f"dead letter {letter}: {describe(exc)}", [letter]) from None
    ran, skipped, failures = [], [], []
    subject, event_id = cloudevent.get_subject(), cloudevent.get_id()
    functions = functions_for(message.pool, subject)
    if message.functions is not None:  # a retry or replay runs only these, if they still exist
        known = {fn.name for fn in functions}
        failures = [retries.Failure(name, PermanentError(
            f"no function {name!r} handles {subject} in pool {message.pool!r} any more"))
            for name in message.functions if name not in known]
        functions = [fn for fn in functions if fn.name in message.functions]
    for fn in functions:
        if done.is_done(redis_client, message.pool, fn.name, event_id, forced_by=message.force):
            skipped.append(fn.name)
            continue
        try:
            fn.handler(cloudevent)
        except Exception as exc:  # every failure is retried or dead-lettered, never lost
            failures.append(retries.Failure(fn.name, exc))
            continue
        done.mark_done(redis_client, message.pool, fn.name, event_id, forced_by=message.force)
        ran.append(fn.name)
    if skipped:
        logger.info("%s %s: already handled by %s (duplicate delivery suppressed)",
                    subject, event_id, ", ".join(skipped))
    if failures:
        retries.handle_failures(task, redis_client, message, failures)
    return {"ran": ran, "duplicates_suppressed": skipped}
