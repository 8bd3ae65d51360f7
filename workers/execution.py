"""What every event task does: validate the message, run the pool's functions once each.

A message follows the task message contract (:mod:`vebaq.core.messages`). For each function of
the pool that handles the event's subject:

1. skip it if its done marker says it already ran for this event id (redelivery, overlap) — for
   a forced replay (``force``), only if that very replay already ran it (:mod:`vebaq.core.done`);
2. dead-letter it without running it if it was interrupted by the loss of its worker
   ``maxDeliveries`` times for this task (the poison breaker, :mod:`workers.breaker`, whose
   journal also names the function running, so that the next delivery knows);
3. run it; on success set the done marker;
4. on failure hand over to :mod:`workers.retries`, which schedules a durable retry of the
   functions that failed, or dead-letters them, and then raises what ends the task (RETRY or
   FAILURE in Flower).

Bad messages (not a CloudEvent, no or unknown pool, an event over the pool's ``maxEventBytes``)
are dead-lettered at once: retrying them would only fail again, and dropping them would lose
them. When Redis cannot take vebaq's own bookkeeping (done markers, a retry, a dead letter), the
message is rejected back to its queue instead of being acked and lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from cloudevents.core.v1.event import CloudEvent

from vebaq.core import replication
from vebaq.core.deadletters import describe
from vebaq.core.envelope import from_structured
from vebaq.core.errors import EventTooLarge, PermanentError, PoisonMessage, SoftTimeLimit
from vebaq.core.messages import TaskMessage
from vebaq.core.redisdb import client, explain_redis_error
from workers import breaker, retries
from workers.pools import POOLS, functions_for
from workers.settings import settings

logger = logging.getLogger("vebaq.worker")


def parse_message(subject: str, kwargs: Mapping[str, Any], args: tuple[Any, ...] = (),
                  max_event_bytes: int | None = None) -> tuple[TaskMessage, CloudEvent]:
    """Validate a task call; raises :class:`PoisonMessage` saying what is wrong.

    :param max_event_bytes: refuse (:class:`EventTooLarge`) a larger event, before parsing it
        (default: the pool's ``maxEventBytes``)."""
    if args:
        raise PoisonMessage(f"a vebaq task takes keyword arguments only, got {len(args)} "
                            "positional argument(s)")
    message = TaskMessage.parse(subject, kwargs)
    if message.pool not in POOLS:
        raise PoisonMessage(f"unknown pool {message.pool!r} "
                            f"(this worker knows {', '.join(sorted(POOLS))})")
    if max_event_bytes is None:
        max_event_bytes = settings().pool_limits(message.pool).max_event_bytes
    size = event_bytes(message.event)
    if size > max_event_bytes:
        raise EventTooLarge(f"the event is {size:,} bytes, more than pools.{message.pool}."
                            f"maxEventBytes ({max_event_bytes:,}): no function ran")
    try:
        cloudevent = from_structured(dict(message.event))
    except ValueError as exc:
        raise PoisonMessage(f"invalid CloudEvent: {exc}") from None
    return message, cloudevent


def event_bytes(event: Mapping[str, Any]) -> int:
    """The size of the structured event as compact JSON, in bytes (what the message carries)."""
    try:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # not JSON-shaped: from_structured says what is wrong
        return 0
    return len(text.encode("utf-8", "surrogatepass"))


def _replicated(r: redis.Redis, subject: str, event_id: str) -> None:
    """Wait for the done markers to reach a replica (if there is one) before the task is acked:
    a marker lost in a failover would let the redelivery run the function again. A lagging
    replica only costs that risk: one warning, the task goes on."""
    try:
        replication.confirm(r)
    except replication.NotReplicated as exc:
        logger.warning("%s %s: done markers set, but %s", subject, event_id, exc)


def handle(task: Task, kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Run the functions; returns a small summary (shown as the task result in Flower), or
    raises :class:`~workers.retries.DeadLettered` or :class:`celery.exceptions.Retry`."""
    started: list[breaker.Delivery] = []  # the delivery, once it has begun
    try:
        return _handle(task, kwargs, args, started)
    except redis.RedisError as exc:
        if started:
            started[0].abandon()
        r = client(task.app.conf.broker_url)
        raise Reject(f"Redis failed ({explain_redis_error(exc, r)}); message requeued",
                     requeue=True) from exc


def _handle(task: Task, kwargs: Mapping[str, Any], args: tuple[Any, ...],
            started: list[breaker.Delivery]) -> dict[str, Any]:
    redis_client = client(task.app.conf.broker_url)
    delivery_info = getattr(task.request, "delivery_info", None) or {}
    try:
        message, cloudevent = parse_message(task.name, kwargs, args)
    except PoisonMessage as exc:
        pool = kwargs.get("pool") or delivery_info.get("routing_key")  # the queue it came from
        letter = retries.dead_letter(
            task, redis_client, kwargs.get("event"), pool, function=None, error=exc,
            attempt=1, message={"args": list(args), "kwargs": dict(kwargs)} if args else None)
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
    current = settings()
    limits = current.pool_limits(message.pool)
    delivery = breaker.Delivery(
        redis_client, getattr(task.request, "id", None) or message.task_id, message.pool,
        event_id, [fn.name for fn in functions],
        redelivered=bool(delivery_info.get("redelivered")), limit=limits.max_deliveries,
        ttl=breaker.journal_ttl(current.visibility_timeout), forced_by=message.force)
    started.append(delivery)
    to_run = []
    for fn in functions:
        if delivery.is_done(fn.name):
            skipped.append(fn.name)
        elif delivery.tripped(fn.name):
            failures.append(retries.Failure(fn.name, delivery.poison(fn.name),
                                            attempts=delivery.interrupted[fn.name]))
        else:
            to_run.append(fn)
    for i, fn in enumerate(to_run):
        following = to_run[i + 1].name if i + 1 < len(to_run) else None
        try:
            fn.handler(cloudevent)
        except SoftTimeLimitExceeded:  # Celery interrupted it: say so, then retry as usual
            failures.append(retries.Failure(fn.name, SoftTimeLimit(
                f"{fn.name} ran past the soft time limit ({limits.soft_time_limit:g}s) and was "
                "interrupted")))
            delivery.ended(fn.name, following, succeeded=False)
            continue
        except Exception as exc:  # every failure is retried or dead-lettered, never lost
            failures.append(retries.Failure(fn.name, exc))
            delivery.ended(fn.name, following, succeeded=False)
            continue
        delivery.ended(fn.name, following, succeeded=True)
        ran.append(fn.name)
    if not to_run:
        delivery.finish()
    if ran:
        _replicated(redis_client, subject, event_id)
    if skipped:
        logger.info("%s %s: already handled by %s (duplicate delivery suppressed)",
                    subject, event_id, ", ".join(skipped))
    if failures:
        retries.handle_failures(task, redis_client, message, failures)
    return {"ran": ran, "duplicates_suppressed": skipped}
