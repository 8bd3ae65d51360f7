"""The task message contract: what producer, retries and replays send and workers parse.

One vebaq task message is a Celery task call:

* **name** — the event's CloudEvent ``subject`` (``VmPoweredOffEvent``, or an EventEx id), so
  Flower lists tasks by subject; an event without a subject (from another source, through
  ``vebaq ingress``) is named after its ``type`` (:func:`task_name`);
* **queue** — the pool's name (:func:`queue_for`), one direct exchange per pool;
* **kwargs** — ``event`` (the structured CloudEvent, :mod:`vebaq.core.envelope`), ``pool``, and
  on a retry or a replay of some functions only: ``attempt``, ``functions`` and
  ``first_failed_at``; for a forced replay ``force`` (the replay's token: run the functions even
  if their done marker is set, see :mod:`vebaq.core.done`);
* **id** — ``<event id>:<pool>`` for the first delivery, ``…:attempt<n>`` for a retry and
  ``…:replay-<token>`` for a replay, so that Flower shows which event a task is.

:class:`TaskMessage` builds them and :meth:`TaskMessage.parse` reads them back, raising
:class:`~vebaq.core.errors.PoisonMessage` that says what is wrong.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu import Exchange, Queue

from vebaq.core.errors import PoisonMessage

#: Task names Celery keeps for itself: a worker refuses them.
RESERVED_NAME_PREFIX = "celery."


def task_name(event: Mapping[str, Any]) -> str:
    """The task name of a structured event: its ``subject``, else its ``type``."""
    return str(event.get("subject") or event.get("type") or "")


@functools.cache
def queue_for(pool: str) -> Queue:
    """The pool's queue, declared by senders and workers alike so that messages sent before a
    worker first starts are kept."""
    return Queue(pool, Exchange(pool, type="direct"), routing_key=pool)


@dataclass(frozen=True)
class TaskMessage:
    """One task call for one pool.

    :param subject: the task name (the CloudEvent subject).
    :param event: the structured CloudEvent.
    :param attempt: 1 for the first delivery, n for the (n-1)th retry.
    :param functions: run only these functions of the pool (a retry or replay); ``None``: all.
    :param first_failed_at: epoch seconds of the first failure, carried to the dead letter.
    :param id_suffix: overrides the id's suffix (``replay-<token>`` for a replay).
    :param force: the token of a forced replay (kept by its retries and dead letters).
    """

    subject: str
    event: Mapping[str, Any]
    pool: str
    attempt: int = 1
    functions: tuple[str, ...] | None = None
    first_failed_at: float | None = None
    id_suffix: str | None = None
    force: str | None = None

    @property
    def event_id(self) -> str:
        return str(self.event.get("id") or "")

    @property
    def task_id(self) -> str:
        base = f"{self.event_id}:{self.pool}"
        if self.id_suffix:
            return f"{base}:{self.id_suffix}"
        return base if self.attempt == 1 else f"{base}:attempt{self.attempt}"

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"event": self.event, "pool": self.pool}
        if self.attempt != 1:
            kwargs["attempt"] = self.attempt
        if self.functions is not None:
            kwargs["functions"] = list(self.functions)
        if self.first_failed_at is not None:
            kwargs["first_failed_at"] = self.first_failed_at
        if self.force:
            kwargs["force"] = self.force
        return kwargs

    def summary(self) -> str:
        """What Flower shows as the arguments: the pool and the event's identity (Celery would
        otherwise render the whole event for every message, the costliest part of a send)."""
        event = self.event
        data = event.get("data")
        host = data.get("Host") if isinstance(data, Mapping) else None
        shown: dict[str, Any] = {"id": self.event_id, "subject": self.subject,
                                 "time": event.get("time"), "source": event.get("source")}
        if isinstance(host, Mapping) and host.get("Name"):
            shown["host"] = host["Name"]
        summary: dict[str, Any] = {"pool": self.pool, "event": shown}
        if self.attempt != 1:
            summary["attempt"] = self.attempt
        if self.functions is not None:
            summary["functions"] = list(self.functions)
        if event.get("replayed"):
            summary["replayed"] = True
        if self.force:
            summary["force"] = self.force
        return repr(summary)

    @classmethod
    def parse(cls, subject: str, kwargs: Mapping[str, Any]) -> TaskMessage:
        """Read a task call's kwargs; raises :class:`PoisonMessage` saying what is wrong (the
        event itself is validated by :func:`vebaq.core.envelope.from_structured`)."""
        pool, event = kwargs.get("pool"), kwargs.get("event")
        if not isinstance(pool, str) or not pool:
            raise PoisonMessage(f"message names no pool (pool={pool!r})")
        if isinstance(event, str | bytes):
            try:
                event = json.loads(event)
            except ValueError as exc:
                raise PoisonMessage(f"invalid CloudEvent: not JSON: {exc}") from None
        if not isinstance(event, Mapping):
            kind = type(event).__name__
            raise PoisonMessage(f"event must be a structured CloudEvent, got {kind}")
        attempt = kwargs.get("attempt", 1)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise PoisonMessage(f"attempt must be a whole number ≥ 1, got {attempt!r}")
        functions = kwargs.get("functions")
        if functions is not None and not (
                isinstance(functions, list) and all(isinstance(f, str) for f in functions)):
            raise PoisonMessage(f"functions must be a list of function names, got {functions!r}")
        first = kwargs.get("first_failed_at")
        if first is not None and (not isinstance(first, int | float) or isinstance(first, bool)):
            first = None
        force = kwargs.get("force")
        if force is not None and not (isinstance(force, str) and force):
            raise PoisonMessage(f"force must be a replay token, got {force!r}")
        return cls(subject, event, pool, attempt,
                   tuple(functions) if functions is not None else None, first, force=force)
