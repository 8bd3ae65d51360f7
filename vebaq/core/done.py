"""Done markers: which (pool, function, event) already ran.

Delivery is at-least-once (late acks, requeue on worker loss, producer overlap after a restart,
replays), so a function may see the same event twice. Before running a function the worker checks
its *done marker*; after a success it sets it. The markers expire after :data:`DONE_TTL`.
"""

from __future__ import annotations

import redis

from vebaq.core import keys

#: Seconds a done marker is kept: longer than any redelivery or producer overlap window.
DONE_TTL = 7 * 24 * 3600


def is_done(r: redis.Redis, pool: str, function: str, event_id: str) -> bool:
    return bool(r.exists(keys.done(pool, function, event_id)))


def mark_done(r: redis.Redis, pool: str, function: str, event_id: str) -> None:
    r.set(keys.done(pool, function, event_id), 1, ex=DONE_TTL)
