"""What every event task does: validate the message, run the pool's functions once each.

A message is ``{"event": <structured CloudEvent>, "pool": <pool name>}`` (task kwargs). For each
function of the pool that handles the event's subject:

1. skip it if its done marker says it already ran for this event id (redelivery, overlap);
2. run it; on success set the done marker;
3. on failure hand over to :mod:`workers.retries`, which retries with back-off or dead-letters.

Bad messages (not a CloudEvent, unknown pool) are dead-lettered at once: retrying them would only
fail again, and dropping them would lose them.
"""

from __future__ import annotations

import logging
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from producer.cloudevent import from_structured
from workers import retries, state
from workers.errors import PoisonMessage
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


def handle(task: Any, event: Any, pool: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Run the functions; returns a small summary (shown as the task result in Flower)."""
    redis_client = state.client(task.app.conf.broker_url)
    try:
        cloudevent, pool = parse_message(event, pool)
    except PoisonMessage as exc:
        retries.dead_letter(task, redis_client, event, pool, function=None, error=exc, attempt=1)
        return {"dead_lettered": str(exc)}
    attempt = int(extra.get("attempt") or 1)
    only = extra.get("functions")  # a retry re-runs only the functions that failed
    ran, skipped = [], []
    for fn in functions_for(pool, cloudevent.get_subject()):
        if only is not None and fn.name not in only:
            continue
        if state.is_done(redis_client, pool, fn.name, cloudevent.get_id()):
            skipped.append(fn.name)
            continue
        try:
            fn.handler(cloudevent)
        except Exception as exc:  # every failure is retried or dead-lettered, never lost
            retries.handle_failure(task, redis_client, event, pool, fn.name, exc, attempt)
            continue
        state.mark_done(redis_client, pool, fn.name, cloudevent.get_id())
        ran.append(fn.name)
    if skipped:
        logger.info("%s %s: already handled by %s (duplicate delivery suppressed)",
                    cloudevent.get_subject(), cloudevent.get_id(), ", ".join(skipped))
    return {"ran": ran, "duplicates_suppressed": skipped}
