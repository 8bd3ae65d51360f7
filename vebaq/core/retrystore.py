"""The retry store: failed work waits in Redis until it is due, never in a worker's memory.

:func:`schedule` stores a retry (the :class:`~vebaq.core.messages.TaskMessage` to send again) in
:data:`~vebaq.core.keys.RETRIES_RECORDS` and its id in the sorted set
:data:`~vebaq.core.keys.RETRIES_DUE`, scored by the time it is due. Senders (the workers'
scheduler threads, :mod:`workers.scheduler`) then:

1. *claim* (:func:`claim`): one Lua script moves up to ``limit`` due ids to
   :data:`~vebaq.core.keys.RETRIES_CLAIMED`, scored by a lease deadline, so that no other sender
   takes them; the same script first gives back every claim whose lease ran out (its sender died
   between claiming and sending);
2. *send* them;
3. *release* (:func:`release`): delete the records and claims.

A sender killed between 2 and 3 makes a retry be sent twice; done markers make the second run
skip what the first finished. Due times and leases use the Redis server's clock (``TIME``), so
hosts with skewed clocks agree on what is due.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from vebaq.core import keys
from vebaq.core.messages import TaskMessage
from vebaq.core.redisdb import Script

#: Most retries one claim takes.
BATCH = 100
#: Seconds a claim is held before it is given back (far longer than sending :data:`BATCH`).
LEASE = 60.0

_SCHEDULE = Script("""
local t = redis.call('TIME')
local due = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], due, ARGV[1])
return tostring(due)
""")

_CLAIM = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit = tonumber(ARGV[2])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('ZREM', KEYS[2], id)
end
local result = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
  redis.call('ZREM', KEYS[1], id)
  table.insert(result, id)
  table.insert(result, redis.call('HGET', KEYS[3], id) or '')
end
return result
""")


@dataclass(frozen=True)
class Retry:
    """A claimed retry: its id, and the message to send (``None`` if its record is unreadable)."""

    id: str
    message: TaskMessage | None
    last_error: str = ""


def schedule(r: redis.Redis, message: TaskMessage, *, delay: float,
             last_error: str) -> tuple[str, float]:
    """Store a retry of ``message`` (whose ``attempt`` is the attempt it will be) due in
    ``delay`` seconds; returns its id and the (Redis clock) time it is due."""
    retry_id = uuid.uuid4().hex[:12]
    record = {"id": retry_id, "task": message.subject, "event": message.event,
              "pool": message.pool, "functions": list(message.functions or ()),
              "attempt": message.attempt, "first_failed_at": message.first_failed_at,
              "last_error": last_error, "scheduled_at": time.time(), "delay": delay,
              "force": message.force}
    due = _SCHEDULE(r, keys=[keys.RETRIES_DUE, keys.RETRIES_RECORDS],
                    args=[retry_id, repr(float(delay)), json.dumps(record, default=str)])
    return retry_id, float(due)


def _message(record: dict[str, Any]) -> TaskMessage:
    return TaskMessage(record["task"], record["event"], record["pool"], int(record["attempt"]),
                       tuple(record.get("functions") or ()), record.get("first_failed_at"),
                       force=record.get("force") or None)


def claim(r: redis.Redis, limit: int = BATCH, lease: float = LEASE) -> list[Retry]:
    """Claim up to ``limit`` due retries for ``lease`` seconds."""
    flat = _CLAIM(r, keys=[keys.RETRIES_DUE, keys.RETRIES_CLAIMED, keys.RETRIES_RECORDS],
                  args=[repr(float(lease)), limit])
    claimed = []
    for i in range(0, len(flat), 2):
        retry_id = flat[i].decode()
        try:
            record = json.loads(flat[i + 1])
            claimed.append(Retry(retry_id, _message(record), record.get("last_error", "")))
        except (ValueError, KeyError, TypeError):
            claimed.append(Retry(retry_id, None))
    return claimed


def release(r: redis.Redis, retry_ids: Sequence[str]) -> None:
    """Forget retries that were sent."""
    if not retry_ids:
        return
    pipe = r.pipeline(transaction=True)
    pipe.zrem(keys.RETRIES_CLAIMED, *retry_ids)
    pipe.hdel(keys.RETRIES_RECORDS, *retry_ids)
    pipe.execute()


def pending(r: redis.Redis) -> int:
    """Retries waiting to be sent (due later, or claimed and being sent)."""
    pipe = r.pipeline(transaction=False)
    pipe.zcard(keys.RETRIES_DUE)
    pipe.zcard(keys.RETRIES_CLAIMED)
    return sum(pipe.execute())
