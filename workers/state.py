"""Worker-side state in Redis: which (event, function) pairs already ran.

Delivery is at-least-once (late acks, requeue on worker loss, producer overlap after a restart),
so a function may see the same event twice. Before running a function the worker checks its
*done marker*; after a success it sets it. The markers expire after :data:`DONE_TTL`.
"""

from __future__ import annotations

import os
import threading

import redis

#: Seconds a done marker is kept: longer than any redelivery or producer overlap window.
DONE_TTL = 7 * 24 * 3600

#: Prefix of every key vebaq writes itself (kombu's keys are its own).
PREFIX = "vebaq"

_clients: dict[tuple[int, str], redis.Redis] = {}
_lock = threading.Lock()


def client(url: str) -> redis.Redis:
    """A Redis client for ``url``, one per process (safe across prefork's fork)."""
    key = (os.getpid(), url)
    with _lock:
        if key not in _clients:
            _clients[key] = redis.Redis.from_url(url, socket_timeout=10,
                                                 socket_connect_timeout=5,
                                                 health_check_interval=30)
        return _clients[key]


def done_key(pool: str, function: str, event_id: str) -> str:
    return f"{PREFIX}:done:{pool}:{function}:{event_id}"


def is_done(r: redis.Redis, pool: str, function: str, event_id: str) -> bool:
    return bool(r.exists(done_key(pool, function, event_id)))


def mark_done(r: redis.Redis, pool: str, function: str, event_id: str) -> None:
    r.set(done_key(pool, function, event_id), 1, ex=DONE_TTL)
