"""The Celery settings every vebaq process shares, and the app senders publish with.

Producer, retry scheduler, replays and workers must agree on how messages travel: JSON only,
late acks, the visibility timeout, task-sent events. :func:`celery_config` is that agreement;
:func:`sender_app` is a plain Celery app with it, for processes that only send (it registers no
task: sending needs only the task's name). The worker app (:mod:`workers.app`) starts from the
same config and adds the worker's own settings.

Redis Sentinel: with a ``sentinel://`` broker URL kombu's Sentinel transport is used, given the
master's name (``master_name``) and the Sentinels' password (``sentinel_kwargs``) as transport
options; the password stays in this process' memory (Celery hides ``*password*`` keys when it
prints its configuration). vebaq's own clients get the same from :mod:`vebaq.core.redisdb`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES, _transport_cache

from vebaq.core.config import Settings
from vebaq.core.redisdb import CONNECT_TIMEOUT, SOCKET_TIMEOUT, is_sentinel
from vebaq.core.transport import TRANSPORTS

#: Longest time between two sweeps for unacked tasks of dead workers, in seconds (kombu ≥ 5.7).
RESTORE_INTERVAL = 10


def pin_transports(transports: Mapping[str, str]) -> None:
    """Make ``transports`` (URL scheme → kombu transport class path) what kombu uses for those
    schemes everywhere in this process, not only where ``broker_transport`` names one.

    kombu takes the transport class from ``broker_transport`` only for the first URL of a
    ``;``-separated broker URL: when a connection fails and it switches to the next
    alternative (``Connection.switch``, e.g. to the next Sentinel after a failover), it parses
    that URL again and its scheme's default transport replaces ours — after the first failover
    the workers would consume through kombu's own channel. Registering our classes under the
    scheme aliases (and dropping kombu's cached resolution of them) closes that."""
    for scheme, target in transports.items():
        TRANSPORT_ALIASES[scheme] = target
        _transport_cache.pop(scheme, None)


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Sentinel transport options for ``settings``' broker (none for ``redis://``)."""
    if not is_sentinel(settings.broker_url):
        return {}
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT,
                                       "socket_connect_timeout": CONNECT_TIMEOUT}
    if settings.sentinel_password:
        sentinel_kwargs["password"] = settings.sentinel_password.reveal()
    return {"master_name": settings.broker_master_name, "sentinel_kwargs": sentinel_kwargs}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for ``settings``' broker (see the module docstring)."""
    # sentinel:// URLs get vebaq.core.transport's SentinelTransport, also after a failover.
    pin_transports(TRANSPORTS)
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
            # A connect() to a host that no longer answers (a killed container's address, the
            # old master the Sentinels still name for a few seconds after a failover) has no
            # end of its own: the worker would wait on it for minutes. Bounded, it fails and
            # kombu moves on (to the next Sentinel's answer).
            "socket_connect_timeout": CONNECT_TIMEOUT,
            **sentinel_transport_options(settings),
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
