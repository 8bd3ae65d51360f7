"""The retry schedule: failed work waits in Redis until it is due, never in a worker's memory.

:func:`schedule` stores a retry (the task to send again and its arguments) in :data:`RECORDS`
and its id in the sorted set :data:`DUE`, scored by the time it is due. Every worker main
process runs a :class:`Scheduler` thread (started by :mod:`workers.hooks`) that, every
:data:`INTERVAL` seconds, moves due retries back onto their pool's queue:

1. *claim*: one Lua script moves up to :data:`BATCH` due ids from :data:`DUE` to
   :data:`CLAIMED`, scored by a lease deadline :data:`LEASE` seconds ahead, so that no other
   worker sends them; the same script first gives back to :data:`DUE` every claim whose lease
   ran out (its worker died between claiming and sending);
2. *send* each one with ``app.send_task`` to ``queue_for(pool)``;
3. *release*: delete its record and its claim.

A worker killed during a back-off loses nothing: the retry is in Redis, and any worker (or the
same one, restarted) sends it when it is due. A worker killed between 2 and 3 makes a retry be
sent twice; the done markers (:mod:`workers.state`) make the second run skip the functions the
first one finished.

Due times and leases use the Redis server's clock (``TIME``), so workers on hosts with skewed
clocks agree on what is due. Pending retries are as durable as Redis is (see
:mod:`workers.deadletters` for the persistence it needs).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import redis
from redis.commands.core import Script

from workers import state
from workers.state import PREFIX

logger = logging.getLogger("vebaq.scheduler")

#: Sorted set of retry id → epoch seconds when it is due.
DUE = f"{PREFIX}:retries:due"
#: Sorted set of retry id → lease deadline: claimed by a worker that is sending it.
CLAIMED = f"{PREFIX}:retries:claimed"
#: Hash of retry id → JSON record (see :func:`schedule`).
RECORDS = f"{PREFIX}:retries:records"

#: Seconds between two sweeps of a worker's scheduler thread (the lateness of a retry).
INTERVAL = 0.5
#: Most retries one claim takes; a sweep claims again at once while it gets this many.
BATCH = 100
#: Seconds a claim is held before a sweep gives it back to :data:`DUE` (far longer than it takes
#: to send :data:`BATCH` messages).
LEASE = 60.0

_SCHEDULE = Script(None, b"""
local t = redis.call('TIME')
local due = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], due, ARGV[1])
return tostring(due)
""")

_CLAIM = Script(None, b"""
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


def schedule(r: redis.Redis, *, task_name: str, event: Any, pool: str, functions: list[str],
             attempt: int, delay: float, first_failed_at: float, last_error: str,
             event_id: str | None = None) -> tuple[str, float]:
    """Store a retry; returns its id and the (Redis clock) time it is due.

    :param task_name: the task to send, i.e. the event subject.
    :param event: the structured CloudEvent, sent again unchanged.
    :param functions: the functions to run again (the ones that failed).
    :param attempt: the attempt number the retry will be (2 for the first retry).
    :param delay: seconds from now.
    :param first_failed_at: epoch seconds of the first failure, carried to the dead letter.
    :param last_error: ``Type: message`` of the failure that caused this retry.
    :param event_id: the CloudEvent id, used in the retry's task id (``<id>:<pool>:attempt2``).
    """
    retry_id = uuid.uuid4().hex[:12]
    record = {"id": retry_id, "task": task_name, "event": event, "pool": pool,
              "functions": list(functions), "attempt": attempt,
              "first_failed_at": first_failed_at, "last_error": last_error,
              "event_id": event_id, "scheduled_at": time.time(), "delay": delay}
    due = _SCHEDULE(keys=[DUE, RECORDS], args=[retry_id, repr(float(delay)),
                                               json.dumps(record, default=str)], client=r)
    return retry_id, float(due)


def claim(r: redis.Redis, limit: int = BATCH,
          lease: float = LEASE) -> list[tuple[str, dict[str, Any] | None]]:
    """Claim up to ``limit`` due retries for ``lease`` seconds; ``(id, record)`` pairs, the
    record ``None`` when it is missing or unreadable."""
    flat = _CLAIM(keys=[DUE, CLAIMED, RECORDS], args=[repr(float(lease)), limit], client=r)
    claimed = []
    for i in range(0, len(flat), 2):
        retry_id = flat[i].decode()
        try:
            record = json.loads(flat[i + 1]) if flat[i + 1] else None
        except ValueError:
            record = None
        claimed.append((retry_id, record))
    return claimed


def release(r: redis.Redis, retry_id: str) -> None:
    """Forget a retry that was sent."""
    pipe = r.pipeline(transaction=True)
    pipe.zrem(CLAIMED, retry_id)
    pipe.hdel(RECORDS, retry_id)
    pipe.execute()


def pending(r: redis.Redis) -> int:
    """Retries waiting to be sent (due later, or claimed and being sent)."""
    pipe = r.pipeline(transaction=False)
    pipe.zcard(DUE)
    pipe.zcard(CLAIMED)
    return sum(pipe.execute())


def send(app: Any, record: dict[str, Any]) -> str:
    """Publish one retry to its pool's queue; returns the task id."""
    from workers.app import queue_for  # late: workers.app imports workers.hooks, which imports us

    pool = record["pool"]
    kwargs = {"event": record["event"], "pool": pool, "attempt": record["attempt"],
              "functions": record["functions"], "first_failed_at": record["first_failed_at"]}
    task_id = (f"{record['event_id']}:{pool}:attempt{record['attempt']}"
               if record.get("event_id") else None)
    return app.send_task(record["task"], kwargs=kwargs, queue=queue_for(pool),
                         task_id=task_id).id


def sweep(app: Any, r: redis.Redis, limit: int = BATCH) -> int:
    """Send every retry that is due; returns how many were sent."""
    sent = 0
    while True:
        claimed = claim(r, limit)
        for retry_id, record in claimed:
            if record is None:
                logger.error("retry %s: its record is missing or unreadable; dropped", retry_id)
            else:
                task_id = send(app, record)
                logger.info("retry %s: sent %s[%s] to pool %s (attempt %d: %s)", retry_id,
                            record["task"], task_id, record["pool"], record["attempt"],
                            ", ".join(record["functions"]))
                sent += 1
            release(r, retry_id)
        if len(claimed) < limit:
            return sent


class Scheduler(threading.Thread):
    """A daemon thread that runs :func:`sweep` every ``interval`` seconds until :meth:`stop`.

    :param app: the Celery app to send with (its ``broker_url`` is also the retry store).
    """

    def __init__(self, app: Any, interval: float = INTERVAL) -> None:
        super().__init__(name="vebaq-retry-scheduler", daemon=True)
        self.app = app
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        r = state.client(self.app.conf.broker_url)
        failing = False
        while not self.stopping.is_set():
            try:
                sweep(self.app, r)
            except Exception as exc:  # Redis or broker down: retries wait in Redis, try later
                if not failing:
                    logger.warning("retry scheduler: cannot send due retries (will keep "
                                   "trying): %s: %s", type(exc).__name__, exc)
                failing = True
            else:
                if failing:
                    logger.info("retry scheduler: sending due retries again")
                failing = False
            self.stopping.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.join(timeout)
