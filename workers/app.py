"""The Celery app: one task per event subject, any subject accepted, safe delivery settings.

Celery runs only task names it knows, in the worker's consumer *and* in each prefork child.
vebaq's task names are event subjects, and ``EventEx``/``ExtendedEvent`` subjects are open-ended
(``com.vmware.cl.CreateLibraryItemEvent``), so:

* every event class pyvmomi knows is registered up front (Flower's task-type list shows them);
* :class:`SubjectRegistry` creates a task on first lookup of any other name, in every process;
* :class:`SubjectConsumer` builds the consumer's strategy for such a name on first sight.

All tasks share one body, :func:`workers.execution.handle`, which runs the functions of the
pool the message was sent to. Their requests are :class:`EventRequest`: the time limits of the
pool the message came from, and the exit status of a pool child that died under a task, for the
poison breaker (:mod:`workers.breaker`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from typing import Any

import redis
from billiard.common import human_status
from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Celery, Task, signals
from celery.app.registry import TaskRegistry
from celery.app.trace import build_tracer
from celery.apps.worker import Worker
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu import Message

from vebaq.core.broker import celery_config
from vebaq.core.config import Settings
from vebaq.core.errors import VebaqError
from vebaq.core.logs import install_scrubber
from vebaq.core.redisdb import client
from vebaq.core.subjects import class_subject, event_classes
from workers import breaker
from workers import signals as vebaq_signals
from workers.execution import handle
from workers.retries import DeadLettered
from workers.settings import settings as worker_settings

logger = logging.getLogger("vebaq.worker")


class EventRequest(Request):
    """A task request in the worker's main process.

    * Its time limits are those of the pool (queue) the message came from
      (:meth:`~vebaq.core.config.Settings.pool_limits`), unless the message carries its own.
      Celery enforces them on the prefork pool: a soft limit raises ``SoftTimeLimitExceeded``
      in the function (retried like any failure), the hard limit kills the child and the task is
      dead-lettered (:func:`workers.signals.dead_letter_failed_task`).
    * When the pool child running it dies (``WorkerLostError``), it records the exit status in
      the task's delivery journal before Celery requeues the task, so that the poison breaker's
      dead letter can say how the worker was lost. A child that dies the moment it takes the
      task can escape billiard's notice; the time limit then finds the child gone, and the
      task is requeued as a lost worker instead of being failed as a slow one.
    """

    def __init__(self, message: Message, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        hard, soft = self.time_limits
        if not hard and not soft:
            pool = (getattr(message, "delivery_info", None) or {}).get("routing_key")
            if isinstance(pool, str) and pool:
                limits = worker_settings().pool_limits(pool)
                self.time_limits = (limits.time_limit, limits.soft_time_limit)

    def on_failure(self, exc_info: ExceptionInfo, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        error = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        status, known = None, True
        if isinstance(error, WorkerLostError):
            status = breaker.exit_status(error)
        elif isinstance(error, SystemExit):  # billiard reports a child's exit this way too
            status = human_status(error.code if isinstance(error.code, int) else 1)
        elif isinstance(error, TimeLimitExceeded) and self._child_gone():
            # The child died right after taking the task, before the pool knew it had: billiard
            # then never reports it lost, and only the time limit ends the wait. It is a lost
            # worker, not a slow function: requeue it, so that the breaker counts it.
            status, known = "the pool child died (unnoticed until the time limit)", False
            self._lost_unnoticed = True
            exc_info = _worker_lost_info(status)
        if status is not None:
            self._record_exit(status, known)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft and getattr(self, "_lost_unnoticed", False):
            logger.warning("%s[%s]: its pool child had died; requeued as a lost worker",
                           self.name, self.id)
            return  # requeued above: no time-limit failure, no dead letter
        super().on_timeout(soft, timeout)

    def _child_gone(self) -> bool:
        pid = self.worker_pid
        return bool(pid) and pid != os.getpid() and process_gone(pid)

    def _record_exit(self, status: str, known: bool) -> None:
        try:
            breaker.record_exit(client(self._app.conf.broker_url), self.id, status,
                                breaker.journal_ttl(worker_settings().visibility_timeout), known)
        except redis.RedisError as exc:
            logger.warning("%s[%s]: cannot record the lost worker's exit status (%s)",
                           self.name, self.id, exc)


def process_gone(pid: int) -> bool:
    """Has process ``pid`` ended — a zombie its parent has not reaped yet included?"""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rpartition(")")[2].split()[0]  # the field after "(name)"
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc here: a zombie cannot be told from the living
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def _worker_lost_info(status: str) -> ExceptionInfo:
    try:
        raise WorkerLostError(f"Worker exited prematurely: {status}.")
    except WorkerLostError:
        return ExceptionInfo()


class EventTask(Task):
    """The task for one event subject; its name is the subject."""

    Request = "workers.app:EventRequest"

    #: Ack after the functions ran, and requeue when the worker process dies mid-task.
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    #: Arguments are checked in :func:`workers.execution.handle`, so a bad message becomes a
    #: dead letter instead of a TypeError before the body runs.
    typing = False
    #: Dead-lettering ends the task as FAILURE (Flower shows the reason); no traceback logged.
    throws = (DeadLettered,)


class SubjectRegistry(TaskRegistry):
    """A task registry that makes an :class:`EventTask` for any name it is asked for."""

    app: VebaqCelery | None = None

    def __missing__(self, name: str) -> Task:
        if self.app is None or not isinstance(name, str) or not name or name.startswith("celery."):
            return super().__missing__(name)
        task = self.app.register_subject(name)
        # The prefork child calls task.__trace__ directly; build it here for late names.
        task.__trace__ = build_tracer(name, task, self.app.loader, app=self.app)
        return task


class _OnDemandStrategies(dict):
    def __init__(self, consumer: Consumer) -> None:
        super().__init__()
        self.consumer = consumer

    def __missing__(self, name: str) -> Callable[..., Any]:
        consumer = self.consumer
        task = consumer.app.tasks[name]  # raises NotRegistered for names we refuse
        strategy = self[name] = task.start_strategy(consumer.app, consumer)
        return strategy


class SubjectConsumer(Consumer):
    """A worker consumer that accepts task names it has never seen (new ``EventEx`` ids)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strategies = _OnDemandStrategies(self)

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        """An undecodable body is dead-lettered (then logged and acked), not silently dropped."""
        vebaq_signals.dead_letter_message(self.app, message, exc)
        super().on_decode_error(message, exc)


class VebaqWorker(Worker):
    """The worker banner names the pools' queues, not ~450 event subjects one per line."""

    def tasklist(self, include_builtins: bool = True, sep: str = "\n",
                 int_: str = "celery.") -> str:
        subjects = [name for name in self.app.tasks if not name.startswith(int_)]
        return (f"  . {len(subjects)} vSphere event subjects, and any EventEx/ExtendedEvent id "
                f"on first sight")


class VebaqCelery(Celery):
    registry_cls = SubjectRegistry

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tasks.app = self

    @cached_property
    def Worker(self) -> type[Worker]:  # noqa: N802 - Celery's name
        return self.subclass_with_self("workers.app:VebaqWorker")

    def register_subject(self, subject: str) -> Task:
        """Create (once) and return the task named ``subject``."""
        if subject in self._tasks:
            return dict.__getitem__(self._tasks, subject)
        return self.task(name=subject, base=EventTask, bind=True)(_run_event)


def _run_event(task: EventTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The body of every event task: run the functions of the message's pool for its event."""
    return handle(task, kwargs, args)


def create_app(settings: Settings | None = None, *, broker_url: str | None = None) -> VebaqCelery:
    """The vebaq worker app.

    :param settings: defaults to the worker process's settings (:mod:`workers.settings`).
    :param broker_url: overrides the settings' broker (tests, benchmarks).
    """
    settings = settings or worker_settings()
    if broker_url:
        settings = replace(settings, broker_url=broker_url)
    app = VebaqCelery("vebaq", set_as_current=True)
    app.conf.update(
        celery_config(settings),
        # Events for Flower: each task shows up under its subject with its state and runtime.
        worker_send_task_events=True,
        task_track_started=True,
        worker_consumer="workers.app:SubjectConsumer",
        worker_hijack_root_logger=False,
        task_default_queue="echo",
    )
    # Named tasks for every event class pyvmomi knows; anything else is created on demand.
    for cls in event_classes():
        app.register_subject(class_subject(cls))
    return app


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _scrub_worker_logs(logger: logging.Logger, **_: Any) -> None:
    try:
        secrets = worker_settings().secrets()
    except VebaqError:
        secrets = ()
    install_scrubber(secrets, logger)
