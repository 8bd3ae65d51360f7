"""Failure handling: retry with back-off and jitter, then dead-letter."""

from __future__ import annotations

import logging
import random
from typing import Any

import redis

from workers import deadletters
from workers.errors import PermanentError

logger = logging.getLogger("vebaq.retries")


def dead_letter(task: Any, r: redis.Redis, event: Any, pool: Any, function: str | None,
                error: BaseException, attempt: int) -> str:
    letter = deadletters.add(r, task_name=task.name, pool=pool, function=function, event=event,
                             error=error, attempt=attempt)
    logger.error("%s → dead letter %s after %d attempt(s): %s: %s", task.name, letter, attempt,
                 type(error).__name__, error)
    return letter


def handle_failure(task: Any, r: redis.Redis, event: Any, pool: str, function: str,
                   error: BaseException, attempt: int) -> None:
    """Retry ``function`` for ``event`` later, or dead-letter it when retrying cannot help."""
    from workers.runtime import settings

    policy = settings().retry_policy(pool)
    if isinstance(error, PermanentError) or attempt > policy.max_retries:
        dead_letter(task, r, event, pool, function, error, attempt)
        return
    delay = policy.delay(attempt, random.random)
    logger.warning("%s: %s failed (attempt %d of %d), retrying in %.1fs: %s: %s", task.name,
                   function, attempt, policy.max_retries + 1, delay, type(error).__name__, error)
    task.apply_async(kwargs={"event": event, "pool": pool, "attempt": attempt + 1,
                             "functions": [function]},
                     queue=pool, countdown=delay)
