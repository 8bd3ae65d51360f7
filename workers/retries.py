"""Failure policy: after a task's functions failed, schedule one durable retry or dead-letter.

For each failed function of a message:

* a :class:`~vebaq.core.errors.PermanentError` (which includes
  :class:`~vebaq.core.errors.PoisonMessage`) is dead-lettered at once;
* any other error is retried while ``attempt <= max_retries`` of the pool's
  :class:`~vebaq.core.config.RetryPolicy`, so a function runs at most ``max_retries + 1`` times;
  then it is dead-lettered with ``attempts = max_retries + 1``.

The functions to retry go into one retry stored in Redis (:mod:`vebaq.core.retrystore`), due
after ``policy.delay(attempt)`` seconds, or after the error's ``retry_after`` (a server's
``Retry-After``, capped at the policy's ``max_retry_after``) when that is longer. The message
itself is acked: nothing waits in a worker's memory.

The task then ends in a state Flower shows with the reason:

* something was dead-lettered: the task raises :class:`DeadLettered`, so Celery records FAILURE
  with ``dead letter <id>: <error>``;
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Retry

from vebaq.core import deadletters, retrystore
from vebaq.core.config import RetryPolicy
from vebaq.core.deadletters import describe
from vebaq.core.errors import PermanentError
from vebaq.core.messages import TaskMessage
from workers.settings import settings

logger = logging.getLogger("vebaq.retries")


class DeadLettered(Exception):
    """Raised by the task after dead-lettering, so that Celery records it as FAILURE (and Flower
    shows it with this message). The message is acked all the same: nothing requeues it.

    :param message: ``dead letter <id>: <reason>`` (several ids for several functions).
    :param letter_ids: the ids of the records written.
    """

    def __init__(self, message: str, letter_ids: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.letter_ids = tuple(letter_ids)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled from a prefork child to its parent
        return type(self), (self.args[0], self.letter_ids)


@dataclass(frozen=True)
class Failure:
    """One function that failed while handling a message.

    :param attempts: how often it ran, when that is not the message's attempt (the poison
        breaker's count of interrupted runs).
    """

    function: str
    error: BaseException
    attempts: int | None = None


def retry_delay(policy: RetryPolicy, attempt: int, errors: Sequence[BaseException],
                rand: Callable[[], float] = random.random) -> float:
    """Seconds before retrying after failed attempt ``attempt``: the policy's back-off, or the
    longest ``retry_after`` one of ``errors`` carries (a server's ``Retry-After``), whichever is
    longer — a ``Retry-After`` cut to the policy's ``max_retry_after``."""
    delay = policy.delay(attempt, rand)
    for error in errors:
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            delay = max(delay, min(float(retry_after), policy.max_retry_after))
    return delay


def dead_letter(task: Task, r: redis.Redis, event: Any, pool: Any, function: str | None,
                error: BaseException, attempt: int, first_failed_at: float | None = None,
                force: str | None = None, message: dict[str, Any] | None = None) -> str:
    """Record a dead letter for ``function`` (``None``: the whole message); returns its id.

    :param force: the token of the forced replay that failed, kept for its replay.
    :param message: the task call as received, for a message that is not a vebaq task call."""
    letter = deadletters.add(r, task_name=task.name, pool=pool, function=function, event=event,
                             error=error, attempt=attempt, first_failed_at=first_failed_at,
                             task_id=getattr(task.request, "id", None), force=force,
                             message=message)
    logger.error("%s → dead letter %s (%s, %d attempt(s)): %s", task.name, letter,
                 function or "message", attempt, describe(error))
    return letter


def handle_failures(task: Task, r: redis.Redis, message: TaskMessage,
                    failures: Sequence[Failure], policy: RetryPolicy | None = None) -> NoReturn:
    """Retry or dead-letter every failure of one message, then raise what ends the task (see
    the module docstring).

    :param message: the message as received; retries and dead letters keep its event.
    :param policy: the pool's retry policy (default: from the worker settings).
    """
    if policy is None:
        policy = settings().retry_policy(message.pool)
    attempt = message.attempt
    first_failed_at = message.first_failed_at or time.time()
    letters: list[tuple[str, Failure]] = []
    retrying: list[Failure] = []
    for failure in failures:
        if isinstance(failure.error, PermanentError) or attempt > policy.max_retries:
            letter = dead_letter(task, r, dict(message.event), message.pool, failure.function,
                                 failure.error, failure.attempts or attempt, first_failed_at,
                                 force=message.force)
            letters.append((letter, failure))
        else:
            retrying.append(failure)

    retry_note = ""
    if retrying:
        delay = retry_delay(policy, attempt, [f.error for f in retrying])
        names = tuple(f.function for f in retrying)
        last_error = "; ".join(describe(f.error) for f in retrying)
        retry_id, due = retrystore.schedule(
            r, replace(message, attempt=attempt + 1, functions=names,
                       first_failed_at=first_failed_at, id_suffix=None),
            delay=delay, last_error=last_error)
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
