"""Producers announcing themselves in Redis, so that they can share the vCenters out.

Every :data:`HEARTBEAT_INTERVAL` each producer process *beats*: one Lua script sets its score in
the sorted set :data:`vebaq.core.keys.PRODUCERS` to Redis' clock (producers on different hosts
need not agree on the time), drops the members not seen for :data:`HEARTBEAT_TTL`, counts the
rest, and rewrites the producer's state record (:func:`vebaq.core.keys.producer_state`: what it
reads and how each vCenter is doing, for ``vebaq status``), which expires :data:`STATE_TTL` after
the last beat. Each producer then reads at most :func:`share` = ceil(vCenters / live producers)
of them (:mod:`producer.supervisor`).

A producer that stops cleanly leaves at once (:meth:`Membership.leave`); one that is killed is
counted until its last beat is :data:`HEARTBEAT_TTL` old — less than the lease TTL, so the
survivors' shares have grown by the time its leases expire, and they take them all at once.

Failure modes: while Redis does not answer, :meth:`Membership.beat` raises and the caller keeps
the last count; a producer paused for longer than :data:`HEARTBEAT_TTL` is counted out by the
others meanwhile, which only lets them take leases that are free anyway.
"""

from __future__ import annotations

import json
import math

import redis

from vebaq.core import keys
from vebaq.core.redisdb import Script

#: Seconds between two beats (and two rounds of the supervisor).
HEARTBEAT_INTERVAL = 1.0

#: Seconds after its last beat that a producer is no longer counted.
HEARTBEAT_TTL = 5.0

#: Seconds a producer's state record outlives its last beat (``vebaq status`` shows it stale).
STATE_TTL = 30.0

#: Beat: score this producer with Redis' clock, drop the silent, count; write the state record.
#: Returns ``{live producers, now}`` (now as a string: Lua numbers become integers in replies).
_BEAT = Script("""
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[1], t, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - tonumber(ARGV[2]))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return {redis.call('ZCARD', KEYS[1]), tostring(t)}
""")


def share(vcenters: int, live: int) -> int:
    """How many of ``vcenters`` one of ``live`` producers reads at most."""
    return math.ceil(vcenters / max(live, 1))


class Membership:
    """One producer's membership of :data:`vebaq.core.keys.PRODUCERS`.

    :param producer_id: the producer's id (:func:`producer.lease.producer_id`).
    """

    def __init__(self, r: redis.Redis, producer_id: str) -> None:
        self.redis = r
        self.producer_id = producer_id

    def beat(self, state: dict) -> int:
        """Announce this producer, with ``state`` as its record; returns how many producers are
        live (this one included). Raises ``redis.RedisError`` when Redis does not answer."""
        live, _now = _BEAT(self.redis, keys=[keys.PRODUCERS, keys.producer_state(self.producer_id)],
                           args=[self.producer_id, HEARTBEAT_TTL, json.dumps(state),
                                 int(STATE_TTL * 1000)])
        return int(live)

    def leave(self) -> None:
        """No longer count this producer (a clean stop): the others' shares grow at once."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(keys.PRODUCERS, self.producer_id)
        pipe.delete(keys.producer_state(self.producer_id))
        pipe.execute()
