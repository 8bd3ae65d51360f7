"""The poison breaker: a function that kills its worker is dead-lettered, not redelivered for ever.

Tasks are acked late and requeued when the worker dies (``task_reject_on_worker_lost``), which
is what keeps an event from being lost when a worker is killed. But a function that itself
kills the process for one event (``os._exit``, a segfault in a C extension, the OOM killer, a
``kill -9`` of its own) would then be delivered again and again: Celery requeues such a task
without a ``task_failure``, and kombu's Redis transport only marks the message *redelivered*; it
does not count.

So a task that comes back keeps a *delivery journal* in Redis (:func:`vebaq.core.keys.delivery`,
one hash per task id), written by the process that runs it (:class:`Delivery`):

* a first delivery — almost every task — writes nothing beyond its done markers: it costs no
  more than before;
* a redelivery (kombu's ``redelivered`` flag: the message was restored after its worker died,
  or outlived the visibility timeout) starts the journal in one Lua script. The run that was
  interrupted is charged to its function's ``lost:<function>`` count: the function the journal
  names as ``running``, or — after a first delivery, which named none — the first function
  whose done marker is missing (functions run in order, and each sets its marker when it
  succeeds). The script reads the done markers and names the function this delivery runs
  first; after each function the journal names the next (pipelined with the done marker), and
  after the last it is deleted;
* a function charged :attr:`~vebaq.core.config.PoolLimits.max_deliveries` times is not run
  again: it is dead-lettered with :class:`~vebaq.core.errors.WorkerLost` ("worker lost 3 times
  while running crash: signal 9 (SIGKILL)"), and the task ends as FAILURE in Flower. The pool's
  other functions still run for the event.

The exit status comes from the prefork parent: it sees ``WorkerLostError`` ("signal 9
(SIGKILL)", "exitcode 1") and records it in the journal (:func:`record_exit`) before Celery
requeues the task. With the threads pool the whole worker dies with its function, nobody is
left to record a status, and the dead letter says only which function was running.

What is counted, and what is not:

* only interrupted runs count, per function: a redelivery whose functions all ran (done
  markers set; the worker died after them, before the ack) runs nothing and counts nothing;
* a task given back because Redis failed under it (:meth:`Delivery.abandon`) is not charged, as
  far as Redis still takes that note;
* charging the first interruption to the first function not done is wrong in one case: an
  earlier function of the same pool had raised (failures are handled at the end of the task)
  and a later one killed the worker. The first count then goes to the function that raised;
  from the second delivery on the journal knows;
* a task that outlives the visibility timeout is delivered again while it still runs (kombu
  restores unacked messages by age), which counts too. Time limits below the visibility
  timeout (:class:`~vebaq.core.config.PoolLimits`) keep that from happening on the prefork pool;
* a worker killed from outside while running an innocent function (a deploy's ``kill -9``)
  counts the same: three of those in a row for one task dead-letter it, and a replay runs it
  again.

A journal lives for :func:`journal_ttl` after its last delivery, longer than any redelivery
takes (the visibility timeout plus a worker restart).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import redis

from vebaq.core import done, keys
from vebaq.core.errors import WorkerLost
from vebaq.core.redisdb import Script

#: Shortest life of a journal after its last delivery, in seconds.
MIN_JOURNAL_TTL = 24 * 3600

# A redelivery starts. KEYS: the journal, then the done markers of the candidate functions, in
# order. ARGV: TTL in ms, the limit, then the candidates' names (in the order of KEYS[2..]).
# Returns, per candidate, its done flag and its interrupted runs; then the last exit status.
_START = Script("""
local journal = KEYS[1]
local done = {}
for i = 2, #KEYS do done[i - 1] = redis.call('EXISTS', KEYS[i]) end
local interrupted = redis.call('HGET', journal, 'running')
if not interrupted then  -- after a first delivery, which names none: the first not done
  for i = 1, #done do
    if done[i] == 0 then interrupted = ARGV[i + 2] break end
  end
end
if interrupted and interrupted ~= '' then
  redis.call('HINCRBY', journal, 'lost:' .. interrupted, 1)
end
redis.call('HINCRBY', journal, 'deliveries', 1)
local limit = tonumber(ARGV[2])
local result, first = {}, ''
for i = 1, #done do
  local name = ARGV[i + 2]
  local lost = tonumber(redis.call('HGET', journal, 'lost:' .. name) or '0')
  result[#result + 1] = done[i]
  result[#result + 1] = lost
  if first == '' and done[i] == 0 and lost < limit then
    first = name  -- what the delivery runs first: not done, not tripped
  end
end
redis.call('HSET', journal, 'running', first)
redis.call('PEXPIRE', journal, ARGV[1])
result[#result + 1] = redis.call('HGET', journal, 'exit') or ''
return result
""")


def journal_ttl(visibility_timeout: float) -> int:
    """Seconds a journal is kept after its last delivery."""
    return int(max(MIN_JOURNAL_TTL, 4 * visibility_timeout))


class Delivery:
    """One delivery of a task: which of its functions are done, which tripped the breaker, and
    the journal kept while they run (for a redelivery only; see the module docstring).

    :param task_id: the Celery task id (the journal's key).
    :param functions: the candidate functions, in the order they run.
    :param redelivered: kombu's flag: the message came back after it was not acked.
    :param limit: the pool's ``maxDeliveries``.
    :param ttl: seconds the journal is kept (:func:`journal_ttl`).
    :param forced_by: the token of a forced replay: a function counts as done only if that
        replay ran it (:func:`vebaq.core.done.is_done`).
    """

    def __init__(self, r: redis.Redis, task_id: str, pool: str, event_id: str,
                 functions: Sequence[str], *, redelivered: bool, limit: int, ttl: int,
                 forced_by: str | None = None) -> None:
        self.redis, self.pool, self.event_id = r, pool, event_id
        self.forced_by = forced_by
        self.key = keys.delivery(task_id)
        self.journaled = redelivered
        self.limit = limit
        self.interrupted: dict[str, int] = {}
        self.exit_status: str | None = None
        self._done: frozenset[str] | None = None
        if redelivered:
            reply = _START(r, keys=[self.key, *(keys.done(pool, f, event_id) for f in functions)],
                           args=[ttl * 1000, limit, *functions])
            pairs = list(zip(functions, reply[0:-1:2], reply[1:-1:2], strict=True))
            # The script sees whether a marker exists; a forced replay asks whose it is.
            self._done = None if forced_by else frozenset(f for f, flag, _ in pairs if flag)
            self.interrupted = {f: int(lost) for f, _, lost in pairs if int(lost)}
            self.exit_status = reply[-1].decode() or None

    def is_done(self, function: str) -> bool:
        """Has ``function`` already succeeded for this event (its done marker)?"""
        if self._done is not None:
            return function in self._done
        return done.is_done(self.redis, self.pool, function, self.event_id, self.forced_by)

    def tripped(self, function: str) -> bool:
        """Has ``function`` been interrupted ``limit`` times: dead-letter, do not run it."""
        return self.interrupted.get(function, 0) >= self.limit

    def poison(self, function: str) -> WorkerLost:
        """The dead letter's reason for a tripped ``function``."""
        times = self.interrupted.get(function, 0)
        how = (f": {self.exit_status}" if self.exit_status else
               " (no exit status: the worker process itself died, or the task outlived the "
               "visibility timeout)")
        return WorkerLost(f"worker lost {times} time{'s' if times != 1 else ''} while running "
                          f"{function}{how}")

    def ended(self, function: str, following: str | None, succeeded: bool) -> None:
        """``function`` returned or raised: set its done marker if it ``succeeded``, and let the
        journal name the ``following`` function as running, or go when none follows (one round
        trip)."""
        if not self.journaled:
            if succeeded:
                done.mark_done(self.redis, self.pool, function, self.event_id, self.forced_by)
            return
        pipe = self.redis.pipeline(transaction=False)
        if succeeded:
            done.mark_done(pipe, self.pool, function, self.event_id, self.forced_by)
        if following is None:
            pipe.delete(self.key)
        else:
            pipe.hset(self.key, "running", following)
        pipe.execute()

    def finish(self) -> None:
        """The delivery ran no function: forget its journal."""
        if self.journaled:
            self.redis.delete(self.key)

    def abandon(self) -> None:
        """The delivery gives its message back because Redis failed under it: no worker was
        lost, so the next delivery must not charge a function. Best effort."""
        # Redis is what failed: if this fails too, the next delivery charges one run too many.
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.key, "running", "")
            pipe.expire(self.key, MIN_JOURNAL_TTL)
            pipe.execute()


def finish(r: redis.Redis, task_id: str) -> None:
    """Forget the journal of a task that ended outside :class:`Delivery` (dead-lettered by a
    signal receiver)."""
    r.delete(keys.delivery(task_id))


def running(r: redis.Redis, task_id: str, pool: str, event_id: str,
            functions: Sequence[str]) -> str | None:
    """The function ``task_id`` was running: the one its journal names, or for a first delivery
    (no journal) the first of ``functions`` not done."""
    value = r.hget(keys.delivery(task_id), "running")
    if value is not None:
        return value.decode() or None
    return next((f for f in functions if not done.is_done(r, pool, f, event_id)), None)


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
