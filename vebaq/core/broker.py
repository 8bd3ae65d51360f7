"""The Celery settings every vebaq process shares, and the app senders publish with.

Producer, retry scheduler, replays and workers must agree on how messages travel: JSON only,
late acks, the visibility timeout, task-sent events. :func:`celery_config` is that agreement;
:func:`sender_app` is a plain Celery app with it, for processes that only send (it registers no
task: sending needs only the task's name). The worker app (:mod:`workers.app`) starts from the
same config and adds the worker's own settings.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from vebaq.core.config import Settings
from vebaq.core.transport import TRANSPORTS

#: Longest time between two sweeps for unacked tasks of dead workers, in seconds (kombu ≥ 5.7).
RESTORE_INTERVAL = 10


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for ``settings``' broker (see the module docstring)."""
    scheme = urlsplit(settings.broker_url).scheme
    transport = {"broker_transport": TRANSPORTS[scheme]} if scheme in TRANSPORTS else {}
    if scheme == "rediss":
        transport["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return {
        "broker_url": settings.broker_url,
        # Fetch and record as unacked in one step (vebaq.core.transport); naming the class drops
        # kombu's rediss:// default of unverified TLS, so TLS is verified as vebaq's own
        # Redis clients verify it.
        **transport,
        # Delivery: ack after the work is done; a dead worker's task goes back to the queue.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            # A killed worker's unacked tasks go back to their queue this long after delivery.
            "visibility_timeout": settings.visibility_timeout,
            # Every live worker sweeps for such tasks this often (at least twice per visibility
            # timeout, so that a short one is honoured).
            "unacked_restore_interval": max(1, min(RESTORE_INTERVAL,
                                                   int(settings.visibility_timeout / 2))),
            "unacked_restore_throttle": 1,
            # vebaq sends no priorities: one list per queue, so an idle worker waits on one key.
            "priority_steps": [0],
        },
        "broker_connection_retry_on_startup": True,
        # Never pickle: messages are JSON, so a forged message cannot run code.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        # A "task-sent" event per message: Flower then shows each task's queue.
        "task_send_sent_event": settings.task_sent_events,
        "task_create_missing_queues": True,
        "enable_utc": True,
    }


def sender_app(settings: Settings, name: str = "vebaq") -> Celery:
    """A Celery app that only sends vebaq task messages (the caller closes it)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
