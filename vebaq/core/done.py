"""Done markers: which (pool, function, event) already ran.

Delivery is at-least-once (late acks, requeue on worker loss, producer overlap after a restart,
replays), so a function may see the same event twice. Before running a function the worker checks
its *done marker*; after a success it sets it. The markers expire after :data:`DONE_TTL`.

A forced replay (``vebaq replay --force``, for a fixed function) runs a function again although
its marker is set. Its messages carry the replay's token, and the marker it sets holds that token:
a redelivery of the *same* forced replay finds its own token and does not run the function a
third time, while a later forced replay (another token) runs it again.
"""

from __future__ import annotations

import redis

from vebaq.core import keys

#: Seconds a done marker is kept: longer than any redelivery or producer overlap window, and at
#: least the event archive's ``maxAge`` (:mod:`vebaq.core.config` refuses a longer one).
DONE_TTL = 7 * 24 * 3600

#: The value of a marker set by a normal (not forced) run.
_RAN = b"1"


def is_done(r: redis.Redis, pool: str, function: str, event_id: str,
            forced_by: str | None = None) -> bool:
    """Whether the function already ran for the event; for a forced replay (``forced_by``: its
    token), whether that replay already ran it."""
    value = r.get(keys.done(pool, function, event_id))
    if forced_by is None:
        return value is not None
    return value == forced_by.encode()


def mark_done(r: redis.Redis, pool: str, function: str, event_id: str,
              forced_by: str | None = None) -> None:
    r.set(keys.done(pool, function, event_id), forced_by or _RAN, ex=DONE_TTL)
