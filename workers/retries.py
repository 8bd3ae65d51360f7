"""Failure policy: after a task's functions failed, schedule one durable retry or dead-letter.

For each failed function of a message:

* a :class:`~workers.errors.PermanentError` (which includes
  :class:`~workers.errors.PoisonMessage`) is dead-lettered at once;
* any other error is retried while ``attempt <= max_retries`` of the pool's
  :class:`~vebaq.config.RetryPolicy`, so a function runs at most ``max_retries + 1`` times; then
  it is dead-lettered with ``attempts = max_retries + 1``.

The functions to retry go into one retry stored in Redis (:mod:`workers.scheduler`), due after
``policy.delay(attempt)`` seconds, or after the error's ``retry_after`` (a server's
``Retry-After``) when that is longer. The message itself is acked: nothing waits in a worker's
memory.

The task then ends in a state Flower shows with the reason:

* something was dead-lettered: the task raises :class:`~workers.deadletters.DeadLettered`, so
  Celery records FAILURE with ``dead letter <id>: <error>``;
* otherwise a retry was scheduled: the task raises :class:`celery.exceptions.Retry`, so Celery
  records RETRY with the attempt, the delay and the error. Unlike ``Task.retry()`` this publishes
  nothing; the next attempt shows up as its own task (``<event id>:<pool>:attempt<n>``).

Either way Celery acks the message (with ``acks_late``, a failed task is acked because
``task_acks_on_failure_or_timeout`` defaults to true, and a Retry is always acked), so it is
neither requeued nor retried by Celery itself.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import redis
from celery.exceptions import Retry

from vebaq.config import RetryPolicy
from workers import deadletters, scheduler
from workers.deadletters import DeadLettered, describe
from workers.errors import PermanentError

logger = logging.getLogger("vebaq.retries")


@dataclass(frozen=True)
class Failure:
    """One function that raised while handling a message."""

    function: str
    error: BaseException


def retry_delay(policy: RetryPolicy, attempt: int, errors: Sequence[BaseException],
                rand: Callable[[], float] = random.random) -> float:
    """Seconds before retrying after failed attempt ``attempt``: the policy's back-off, or the
    longest ``retry_after`` one of ``errors`` carries, whichever is longer."""
    delay = policy.delay(attempt, rand)
    for error in errors:
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            delay = max(delay, float(retry_after))
    return delay


def dead_letter(task: Any, r: redis.Redis, event: Any, pool: Any, function: str | None,
                error: BaseException, attempt: int, first_failed_at: float | None = None) -> str:
    """Record a dead letter for ``function`` (``None``: the whole message); returns its id."""
    letter = deadletters.add(r, task_name=task.name, pool=pool, function=function, event=event,
                             error=error, attempt=attempt, first_failed_at=first_failed_at,
                             task_id=getattr(task.request, "id", None))
    logger.error("%s → dead letter %s (%s, %d attempt(s)): %s", task.name, letter,
                 function or "message", attempt, describe(error))
    return letter


def handle_failures(task: Any, r: redis.Redis, event: Any, pool: str,
                    failures: Sequence[Failure], *, attempt: int,
                    first_failed_at: float | None = None, event_id: str | None = None,
                    policy: RetryPolicy | None = None) -> NoReturn:
    """Retry or dead-letter every failure of one message, then raise what ends the task (see
    the module docstring).

    :param event: the structured CloudEvent as received; retries and dead letters keep it.
    :param attempt: the attempt that just failed (1 for the first run).
    :param first_failed_at: epoch seconds of the first failure of an earlier attempt, if any.
    :param event_id: the CloudEvent id, for the retry's task id.
    :param policy: the pool's retry policy (default: from the worker settings).
    """
    if policy is None:
        from workers.runtime import settings

        policy = settings().retry_policy(pool)
    if not isinstance(first_failed_at, int | float) or isinstance(first_failed_at, bool):
        first_failed_at = time.time()
    letters: list[tuple[str, Failure]] = []
    retrying: list[Failure] = []
    for failure in failures:
        if isinstance(failure.error, PermanentError) or attempt > policy.max_retries:
            letter = dead_letter(task, r, event, pool, failure.function, failure.error, attempt,
                                 first_failed_at)
            letters.append((letter, failure))
        else:
            retrying.append(failure)

    retry_note = ""
    if retrying:
        delay = retry_delay(policy, attempt, [f.error for f in retrying])
        names = [f.function for f in retrying]
        last_error = "; ".join(describe(f.error) for f in retrying)
        retry_id, due = scheduler.schedule(
            r, task_name=task.name, event=event, pool=pool, functions=names,
            attempt=attempt + 1, delay=delay, first_failed_at=first_failed_at,
            last_error=last_error, event_id=event_id)
        retry_note = (f"{', '.join(names)} failed (attempt {attempt} of "
                      f"{policy.max_retries + 1}), retry {retry_id} in {delay:.1f}s: {last_error}")
        logger.warning("%s: %s", task.name, retry_note)
    if letters:
        reasons = "; ".join(f"dead letter {letter}: {failure.function}: {describe(failure.error)}"
                            for letter, failure in letters)
        raise DeadLettered(reasons + (f" (and {retry_note})" if retry_note else ""),
                           [letter for letter, _ in letters])
    raise Retry(retry_note, exc=retrying[0].error,
                when=datetime.datetime.fromtimestamp(due, datetime.UTC))
