"""The poison breaker: a function that kills its worker is dead-lettered, not redelivered for ever.

Tasks are acked late and requeued when the worker dies (``task_reject_on_worker_lost``), which
is what keeps an event from being lost when a worker is killed. But a function that itself
kills the process for one event (``os._exit``, a segfault in a C extension, the OOM killer, a
``kill -9`` of its own) would then be delivered again and again: Celery requeues such a task
without a ``task_failure``, and kombu's Redis transport only marks a message *redelivered*, it
does not count.

So every task keeps a *delivery journal* in Redis (:func:`vebaq.core.keys.delivery`, one hash
per task id), written by the process that runs the task:

* when a delivery starts (:func:`start`, one Lua script), the journal counts it, and if it still
  names a function as ``running``, that function's run was interrupted: its ``lost:<function>``
  count goes up. The script also reads the event's done markers and names the first function
  this delivery will run as ``running``;
* after each function it names the next one (:func:`advance`, pipelined with the done marker),
  and after the last one it deletes the journal: a finished task (success, retry scheduled,
  dead-lettered) leaves nothing behind;
* a function interrupted :attr:`~vebaq.core.config.PoolLimits.max_deliveries` times is not run
  again: it is dead-lettered with :class:`~vebaq.core.errors.WorkerLost` ("worker lost 3 times
  while running crash: signal 9 (SIGKILL)"), and the task ends as FAILURE in Flower. The other
  functions of the pool still run for the event.

The exit status comes from the prefork parent: it sees ``WorkerLostError`` ("signal 9
(SIGKILL)", "exitcode 1") and records it in the journal (:func:`record_exit`) before Celery
requeues the task. With the threads pool the whole worker dies with its function, nobody is
left to record a status, and the journal says only which function was running.

What is counted, and what is not:

* only runs that were *interrupted* count, per function: a redelivery whose functions already
  ran (their done markers are set; the worker died after them, before the ack) runs nothing
  and counts nothing, and a function that failed with an exception went through the retry
  policy instead;
* a task that outlives the visibility timeout is delivered again while it still runs (kombu
  restores unacked messages by age); that counts as an interruption too. Time limits below the
  visibility timeout (:class:`~vebaq.core.config.PoolLimits`) keep that from happening on the
  prefork pool;
* a worker killed from outside while running an innocent function (a deploy's ``kill -9``)
  counts the same: three of those in a row for one task dead-letter it, and a replay runs it
  again.

A journal lives for :func:`journal_ttl` after its last delivery, longer than any redelivery
takes (the visibility timeout plus a worker restart).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis

from vebaq.core import done, keys
from vebaq.core.errors import WorkerLost
from vebaq.core.redisdb import Script

#: Shortest life of a journal after its last delivery, in seconds.
MIN_JOURNAL_TTL = 24 * 3600

# KEYS: the journal, then the done markers of the candidate functions, in order.
# ARGV: TTL in ms, the limit, then the candidate functions' names (in the order of KEYS[2..]).
# Returns {done flags, the journal as a flat field/value list}.
_START = Script("""
local journal = KEYS[1]
local interrupted = redis.call('HGET', journal, 'running')
if interrupted and interrupted ~= '' then
  redis.call('HINCRBY', journal, 'lost:' .. interrupted, 1)
end
redis.call('HINCRBY', journal, 'deliveries', 1)
local limit = tonumber(ARGV[2])
local done, first = {}, ''
for i = 2, #KEYS do
  local name = ARGV[i + 1]
  done[i - 1] = redis.call('EXISTS', KEYS[i])
  if first == '' and done[i - 1] == 0
     and tonumber(redis.call('HGET', journal, 'lost:' .. name) or '0') < limit then
    first = name  -- the same rule as Delivery.runs: not done, not tripped
  end
end
redis.call('HSET', journal, 'running', first)
redis.call('PEXPIRE', journal, ARGV[1])
return {done, redis.call('HGETALL', journal)}
""")


def journal_ttl(visibility_timeout: float) -> int:
    """Seconds a journal is kept after its last delivery."""
    return int(max(MIN_JOURNAL_TTL, 4 * visibility_timeout))


@dataclass(frozen=True)
class Delivery:
    """One delivery of a task, as its journal saw it when the delivery started.

    :param key: the journal's Redis key.
    :param number: deliveries of this task so far, this one included.
    :param done: the functions whose done marker is set for the event.
    :param interrupted: function → runs of it that ended with the worker lost.
    :param exit_status: how the last lost worker process ended, if its parent saw it.
    :param limit: the pool's ``maxDeliveries``.
    """

    key: str
    number: int
    done: frozenset[str]
    interrupted: Mapping[str, int] = field(default_factory=dict)
    exit_status: str | None = None
    limit: int = 3

    def tripped(self, function: str) -> bool:
        """Has ``function`` been interrupted ``limit`` times: dead-letter, do not run it."""
        return self.interrupted.get(function, 0) >= self.limit

    def runs(self, function: str) -> bool:
        """Does this delivery run ``function`` (neither done nor tripped)?"""
        return function not in self.done and not self.tripped(function)

    def poison(self, function: str) -> WorkerLost:
        """The dead letter's reason for a tripped ``function``."""
        times = self.interrupted.get(function, 0)
        how = (f": {self.exit_status}" if self.exit_status else
               " (no exit status: the worker process itself died, or the task outlived the "
               "visibility timeout)")
        return WorkerLost(f"worker lost {times} time{'s' if times != 1 else ''} while running "
                          f"{function}{how}")


def start(r: redis.Redis, task_id: str, pool: str, event_id: str, functions: Sequence[str],
          limit: int, ttl: int) -> Delivery:
    """Record the start of a delivery of ``task_id`` whose candidate ``functions`` (in order)
    run for ``event_id`` in ``pool``; see the module docstring."""
    key = keys.delivery(task_id)
    flags, flat = _START(r, keys=[key, *(keys.done(pool, f, event_id) for f in functions)],
                         args=[ttl * 1000, limit, *functions])
    journal = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    return Delivery(
        key=key, number=int(journal.get("deliveries", 1)),
        done=frozenset(f for f, flag in zip(functions, flags, strict=True) if flag),
        interrupted={name[5:]: int(count) for name, count in journal.items()
                     if name.startswith("lost:")},
        exit_status=journal.get("exit") or None, limit=limit)


def advance(r: redis.Redis, delivery: Delivery, following: str | None,
            succeeded: tuple[str, str, str] | None = None) -> None:
    """A function of the delivery ended: set its done marker if it ``succeeded`` (``(pool,
    function, event id)``), and name the ``following`` function as running — or, when there
    is none, delete the journal (one round trip)."""
    pipe = r.pipeline(transaction=False)
    if succeeded is not None:
        done.mark_done(pipe, *succeeded)
    if following is None:
        pipe.delete(delivery.key)
    else:
        pipe.hset(delivery.key, "running", following)
    pipe.execute()


def finish(r: redis.Redis, task_id: str) -> None:
    """Forget the task's journal (it ended without running a function, or was dead-lettered
    from outside the task)."""
    r.delete(keys.delivery(task_id))


def abandon(r: redis.Redis, delivery: Delivery) -> None:
    """The delivery gives its message back (Redis failed under it): a worker was not lost, so
    the function named running must not be counted as interrupted. Best effort."""
    # Redis is what failed: if this fails too, the next delivery counts one interruption more.
    with contextlib.suppress(redis.RedisError):
        r.hset(delivery.key, "running", "")


def running(r: redis.Redis, task_id: str) -> str | None:
    """The function the task's journal names as running, if any."""
    value = r.hget(keys.delivery(task_id), "running")
    return value.decode() if value else None


_EXIT = re.compile(r"exited prematurely: (?P<status>.+?)(?: Job: \d+)?\.?$")


def exit_status(error: BaseException) -> str:
    """``signal 9 (SIGKILL)`` or ``exitcode 1`` from Celery's ``WorkerLostError``."""
    match = _EXIT.search(str(error))
    return match.group("status") if match else str(error)


def record_exit(r: redis.Redis, task_id: str, status: str, ttl: int, known: bool = True) -> None:
    """Keep how the process running ``task_id`` ended, for the dead letter's reason.

    :param known: ``False`` for a status that only says the process is gone: it does not
        replace a real one (``signal 9 (SIGKILL)``) recorded before."""
    pipe = r.pipeline(transaction=False)
    if known:
        pipe.hset(keys.delivery(task_id), "exit", status)
    else:
        pipe.hsetnx(keys.delivery(task_id), "exit", status)
    pipe.expire(keys.delivery(task_id), ttl)
    pipe.execute()
