"""What every event task does: validate the message, run the pool's functions once each.

A message is ``{"event": <structured CloudEvent>, "pool": <pool name>}`` (task kwargs). For each
function of the pool that handles the event's subject:

1. skip it if its done marker says it already ran for this event id (redelivery, overlap);
2. run it; on success set the done marker;
3. on failure hand over to :mod:`workers.retries`, which schedules a durable retry of the
   functions that failed, or dead-letters them, and then raises what ends the task (RETRY or
   FAILURE in Flower).

Bad messages (not a CloudEvent, no or unknown pool) are dead-lettered at once: retrying them
would only fail again, and dropping them would lose them.

A retry message carries ``attempt``, ``functions`` (run only these) and ``first_failed_at`` next
to ``event`` and ``pool``. When Redis cannot take vebaq's own bookkeeping (done markers, a retry,
a dead letter), the message is rejected back to its queue instead of being acked and lost.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.exceptions import Reject
from cloudevents.core.v1.event import CloudEvent

from producer.cloudevent import from_structured
from workers import retries, state
from workers.deadletters import DeadLettered, describe
from workers.errors import PermanentError, PoisonMessage
from workers.pools import POOLS, functions_for

logger = logging.getLogger("vebaq.worker")


def parse_message(event: Any, pool: Any) -> tuple[CloudEvent, str]:
    """Validate the task arguments; raises :class:`PoisonMessage` saying what is wrong."""
    if not isinstance(pool, str) or not pool:
        raise PoisonMessage(f"message names no pool (pool={pool!r})")
    if pool not in POOLS:
        raise PoisonMessage(f"unknown pool {pool!r} (this worker knows {', '.join(sorted(POOLS))})")
    if not isinstance(event, dict | str | bytes):
        raise PoisonMessage(f"event must be a structured CloudEvent, got {type(event).__name__}")
    try:
        cloudevent = from_structured(event)
    except Exception as exc:  # the SDK raises several unrelated types for bad input
        raise PoisonMessage(f"invalid CloudEvent: {exc}") from None
    return cloudevent, pool


def _retry_arguments(extra: dict[str, Any]) -> tuple[int, list[str] | None]:
    """``attempt`` and ``functions`` of a retry message (1 and every function otherwise)."""
    attempt, only = extra.get("attempt") or 1, extra.get("functions")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise PoisonMessage(f"attempt must be a whole number ≥ 1, got {attempt!r}")
    if only is not None and not (isinstance(only, list) and all(isinstance(f, str) for f in only)):
        raise PoisonMessage(f"functions must be a list of function names, got {only!r}")
    return attempt, only


def handle(task: Any, event: Any, pool: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Run the functions; returns a small summary (shown as the task result in Flower), or
    raises :class:`~workers.deadletters.DeadLettered` or :class:`celery.exceptions.Retry`."""
    try:
        return _handle(task, event, pool, extra)
    except redis.RedisError as exc:
        raise Reject(f"Redis failed ({type(exc).__name__}: {exc}); message requeued",
                     requeue=True) from exc


def _handle(task: Any, event: Any, pool: Any, extra: dict[str, Any]) -> dict[str, Any]:
    redis_client = state.client(task.app.conf.broker_url)
    try:
        cloudevent, pool = parse_message(event, pool)
        attempt, only = _retry_arguments(extra)
    except PoisonMessage as exc:
        letter = retries.dead_letter(task, redis_client, event, pool, function=None, error=exc,
                                     attempt=1)
        raise DeadLettered(f"dead letter {letter}: {describe(exc)}", [letter]) from None
    ran, skipped, failures = [], [], []
    functions = functions_for(pool, cloudevent.get_subject())
    if only is not None:  # a retry or replay runs only what failed, if it still exists
        known = {fn.name for fn in functions}
        failures = [retries.Failure(name, PermanentError(
            f"no function {name!r} handles {cloudevent.get_subject()} in pool {pool!r} any more"))
            for name in only if name not in known]
        functions = [fn for fn in functions if fn.name in only]
    for fn in functions:
        if state.is_done(redis_client, pool, fn.name, cloudevent.get_id()):
            skipped.append(fn.name)
            continue
        try:
            fn.handler(cloudevent)
        except Exception as exc:  # every failure is retried or dead-lettered, never lost
            failures.append(retries.Failure(fn.name, exc))
            continue
        state.mark_done(redis_client, pool, fn.name, cloudevent.get_id())
        ran.append(fn.name)
    if skipped:
        logger.info("%s %s: already handled by %s (duplicate delivery suppressed)",
                    cloudevent.get_subject(), cloudevent.get_id(), ", ".join(skipped))
    if failures:
        retries.handle_failures(task, redis_client, event, pool, failures, attempt=attempt,
                                first_failed_at=extra.get("first_failed_at"),
                                event_id=cloudevent.get_id())
    return {"ran": ran, "duplicates_suppressed": skipped}
