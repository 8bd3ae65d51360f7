"""The Celery app: one task per event subject, any subject accepted, safe delivery settings.

Celery runs only task names it knows, in the worker's consumer *and* in each prefork child.
vebaq's task names are event subjects, and ``EventEx``/``ExtendedEvent`` subjects are open-ended
(``com.vmware.cl.CreateLibraryItemEvent``), so:

* every event class pyvmomi knows is registered up front (Flower's task-type list shows them);
* :class:`SubjectRegistry` creates a task on first lookup of any other name, in every process;
* :class:`SubjectConsumer` builds the consumer's strategy for such a name on first sight.

All tasks share one body, :func:`workers.execution.handle`, which runs the functions of the
pool the message was sent to.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from functools import cached_property
from typing import Any

from celery import Celery, Task, signals
from celery.app.registry import TaskRegistry
from celery.app.trace import build_tracer
from celery.apps.worker import Worker
from celery.worker.consumer import Consumer
from kombu import Exchange, Queue

from producer.cloudevent import event_classes
from vebaq.config import DEFAULT_BROKER_URL
from vebaq.errors import VebaqError
from vebaq.logs import install_scrubber
from workers import hooks
from workers.deadletters import DeadLettered


class EventTask(Task):
    """The task for one event subject; its name is the subject."""

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

    app: Celery | None = None

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

    def __missing__(self, name: str) -> Any:
        consumer = self.consumer
        task = consumer.app.tasks[name]  # raises NotRegistered for names we refuse
        strategy = self[name] = task.start_strategy(consumer.app, consumer)
        return strategy


class SubjectConsumer(Consumer):
    """A worker consumer that accepts task names it has never seen (new ``EventEx`` ids)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strategies = _OnDemandStrategies(self)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """An undecodable body is dead-lettered (then logged and acked), not silently dropped."""
        hooks.dead_letter_message(self.app, message, exc)
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
    def Worker(self) -> type:  # noqa: N802 - Celery's name
        return self.subclass_with_self("workers.app:VebaqWorker")

    def register_subject(self, subject: str) -> Task:
        """Create (once) and return the task named ``subject``."""
        if subject in self._tasks:
            return dict.__getitem__(self._tasks, subject)
        return self.task(name=subject, base=EventTask, bind=True)(_run_event)


def _run_event(task: EventTask, event: Any = None, pool: Any = None, **extra: Any) -> Any:
    """The body of every event task: run the functions of ``pool`` for ``event``."""
    from workers.execution import handle  # imported late: execution imports this module

    return handle(task, event, pool, extra)


#: The pools' queues, declared by producers and workers so that messages published before a
#: worker first starts are kept.
@functools.cache
def queue_for(pool: str) -> Queue:
    return Queue(pool, Exchange(pool, type="direct"), routing_key=pool)


#: Seconds before a dead worker's unacked tasks are redelivered (``VEBAQ_VISIBILITY_TIMEOUT``).
DEFAULT_VISIBILITY_TIMEOUT = 300.0
#: Seconds between two sweeps for such tasks.
RESTORE_INTERVAL = 10


def create_app(broker_url: str | None = None) -> VebaqCelery:
    """The vebaq Celery app.

    :param broker_url: Redis URL; defaults to ``$VEBAQ_BROKER_URL``, then a local Redis.
    """
    visibility_timeout = float(os.environ.get("VEBAQ_VISIBILITY_TIMEOUT") or
                               DEFAULT_VISIBILITY_TIMEOUT)
    app = VebaqCelery("vebaq", set_as_current=True)
    app.conf.update(
        broker_url=broker_url or os.environ.get("VEBAQ_BROKER_URL") or DEFAULT_BROKER_URL,
        # Delivery: ack after the work is done; a dead worker's task goes back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # A killed worker's unacked tasks go back to their queue this long after delivery.
            # Retries never wait in worker memory (workers.scheduler), so this only has to
            # exceed the longest task run; lower means faster crash recovery.
            "visibility_timeout": visibility_timeout,
            # Every live worker sweeps for such tasks this often (kombu ≥ 5.7).
            "unacked_restore_interval": RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # Never pickle: messages are JSON, so a forged message cannot run code.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # Events for Flower: each task shows up under its subject with its state and runtime.
        worker_send_task_events=True,
        # A "task-sent" event per message from the producer: Flower then shows each task's
        # queue, and tasks still waiting in it. It costs a second publish per task
        # (VEBAQ_TASK_SENT_EVENTS=false turns it off for the fastest backlog drain).
        task_send_sent_event=os.environ.get("VEBAQ_TASK_SENT_EVENTS", "true").lower()
        not in ("false", "0", "no", "off"),
        task_track_started=True,
        worker_consumer="workers.app:SubjectConsumer",
        worker_hijack_root_logger=False,
        task_create_missing_queues=True,
        task_default_queue="echo",
        enable_utc=True,
    )
    # Named tasks for every event class pyvmomi knows; anything else is created on demand.
    for cls in event_classes():
        app.register_subject(cls.__name__.rsplit(".", 1)[-1])
    return app


@signals.worker_init.connect
def _load_settings_early(**_: Any) -> None:
    """Fail at start, in one line, on a bad config, instead of on the first task."""
    from workers.runtime import settings

    try:
        settings()
    except VebaqError as exc:
        print(f"vebaq: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _scrub_worker_logs(logger: logging.Logger, **_: Any) -> None:
    from workers.runtime import settings

    try:
        secrets = settings().secrets()
    except VebaqError:
        secrets = ()
    install_scrubber(secrets, logger)
