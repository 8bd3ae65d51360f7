"""The worker-throughput baseline: a Celery app with one task that does nothing, on the same
broker and with the delivery settings of :func:`workers.app.create_app`.

``celery -A bench.bare_app worker -Q bare`` (started by :mod:`bench.throughput`).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

#: The queue (and direct exchange) of the bare task, declared like a vebaq pool's.
QUEUE = "bare"

#: The no-op task's name.
TASK = "bench.noop"

#: The settings of ``workers.app.create_app`` that affect a task's cost on the worker
#: (:func:`bench.throughput.check_bare_settings` verifies that they still match).
SETTINGS: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "broker_transport_options": {"visibility_timeout": 300},
    "task_serializer": "json",
    "accept_content": ["json"],
    "result_serializer": "json",
    "task_ignore_result": True,
    "worker_send_task_events": True,
    "task_send_sent_event": True,
    "task_track_started": True,
    "worker_hijack_root_logger": False,
    "enable_utc": True,
}


def queue() -> Queue:
    return Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)


def create_app(broker_url: str | None = None) -> Celery:
    """The bare app on ``broker_url`` (default ``$VEBAQ_BROKER_URL``)."""
    bare = Celery("bench-bare", set_as_current=False)
    bare.conf.update(SETTINGS, broker_url=broker_url or os.environ["VEBAQ_BROKER_URL"],
                     task_default_queue=QUEUE)

    @bare.task(name=TASK, ignore_result=True, acks_late=True, typing=False)
    def noop(event: Any = None, pool: Any = None, **extra: Any) -> None:
        """Takes the same arguments as a vebaq event task, and does nothing."""

    return bare


#: The app ``celery -A bench.bare_app`` finds.
app = create_app() if os.environ.get("VEBAQ_BROKER_URL") else None
