"""Waiting for a write to reach a Redis replica before vebaq counts it as durable.

Redis replicates asynchronously: a master that acknowledged a write and is then ``kill -9``-ed
before its replica received the write takes it along, and the replica Sentinel promotes never
had it. For most of vebaq's keys that costs at most a duplicate (a task whose pop was lost is
delivered again). Three writes are different, because something outside Redis acts on them
being kept:

* the producer's **checkpoint**: once it is committed the producer reads on from vCenter and
  never reads those events again — if the failover loses the batch, nobody sends it;
* a worker's **done markers**: once a function ran, its marker is what suppresses the
  redelivery — lost, the function runs twice;
* the ingress' **202**: once answered, the client forgets the events.

:func:`confirm` is called after each of them. When the master has replicas in sync (``INFO
replication``: ``online``, lag ≤ :data:`REPLICA_MAX_LAG`; looked up at most every
:data:`REPLICAS_CHECK_INTERVAL` seconds per client, and again when a wait timed out) it writes a
probe key and runs ``WAIT 1`` :data:`WAIT_TIMEOUT` in the same round trip. Redis replicates one
ordered stream, so a replica that has the probe has every write the master took before it, on
any connection (kombu's task messages included). Without such replicas nothing is sent at all:
a single Redis pays nothing.

Failure modes: the master dying during the wait is a ``redis.ConnectionError`` like any failed
write (the caller keeps its batch and sends it again to the promoted replica: at least once, the
duplicates suppressed by id). A replica connected but not acknowledging within
:data:`WAIT_TIMEOUT` raises :class:`NotReplicated` (counted in :data:`NOT_REPLICATED` and
logged by the caller): the write is on the master, only not yet known to be on a replica.
"""

from __future__ import annotations

import threading
import time

import redis

from vebaq.core import keys

#: Milliseconds ``WAIT`` gives a replica to acknowledge a write: longer than a healthy replica's
#: lag on a LAN (well under 10 ms), short enough that a lagging one delays a batch visibly
#: rather than stalls it.
WAIT_TIMEOUT = 2000
#: Seconds a client's count of connected replicas is trusted before ``INFO replication`` is
#: asked again (a replica that just attached is waited for at most this much later). Shorter
#: than a Sentinel failover takes (≥ 2 s: ``down-after-milliseconds`` plus the election), so the
#: promoted replica — a master without replicas yet — is asked afresh, not waited on.
REPLICAS_CHECK_INTERVAL = 1.0
#: A replica is waited for only while in sync and heard from within this many seconds (it
#: acknowledges every second): one still loading its first copy (the old master back after a
#: failover, resynchronising) or cut off without the master noticing yet would only make every
#: confirmation time out. The same rule as Redis' own ``min-replicas-max-lag``.
REPLICA_MAX_LAG = 5
#: Seconds the probe key lives (it only needs to exist long enough to be replicated).
PROBE_TTL = 60

#: Confirmations that timed out in this process (a replica connected but lagging).
NOT_REPLICATED = 0

_replicas: dict[int, tuple[float, int]] = {}  # id(client) → (when looked up, connected_slaves)
_lock = threading.Lock()


def _acknowledging(replica: object) -> bool:
    """A replica of ``INFO replication`` (``slave0: {ip, port, state, offset, lag}``) that can
    acknowledge now: in sync (``online``, not loading its first copy) and heard from within
    :data:`REPLICA_MAX_LAG` seconds."""
    if not isinstance(replica, dict):
        return False
    try:
        return replica.get("state") == "online" and int(replica.get("lag", 0)) <= REPLICA_MAX_LAG
    except (TypeError, ValueError):
        return False


class NotReplicated(redis.RedisError):
    """The master has a replica, and it did not acknowledge the write within the timeout (a
    ``RedisError``: where a failed write keeps a batch for sending again, this does too)."""


def replicas(r: redis.Redis, now: float | None = None) -> int:
    """How many replicas the master behind ``r`` has (cached per client, see the module)."""
    now = time.monotonic() if now is None else now
    with _lock:
        cached = _replicas.get(id(r))
    if cached is not None and now - cached[0] < REPLICAS_CHECK_INTERVAL:
        return cached[1]
    try:
        info = r.info("replication")
    except redis.ResponseError:
        # A server without INFO (the embedded broker of `vebaq dev`: fakeredis) replicates to
        # no one.
        info = {}
    count = sum(1 for i in range(int(info.get("connected_slaves", 0)))
                if _acknowledging(info.get(f"slave{i}")))
    with _lock:
        _replicas[id(r)] = (now, count)
    return count


def confirm(r: redis.Redis, timeout_ms: int = WAIT_TIMEOUT) -> int:
    """Block until a replica has every write the master took so far; returns how many replicas
    acknowledged (0 without replicas: nothing waited for). Raises :class:`NotReplicated` when
    replicas exist and none acknowledged within ``timeout_ms``, ``redis.RedisError`` when the
    master fails meanwhile."""
    global NOT_REPLICATED
    if replicas(r) == 0:
        return 0
    pipe = r.pipeline(transaction=False)
    pipe.set(keys.REPLICATION_PROBE, repr(time.time()), ex=PROBE_TTL)
    pipe.execute_command("WAIT", 1, timeout_ms)
    acknowledged = int(pipe.execute()[1])
    if acknowledged == 0:
        with _lock:
            _replicas.pop(id(r), None)
        if replicas(r) == 0:  # the replica went away meanwhile: nothing to wait for
            return 0
        with _lock:
            NOT_REPLICATED += 1
        raise NotReplicated(f"no Redis replica acknowledged the write within {timeout_ms} ms "
                            "(a failover now could lose it)")
    return acknowledged
