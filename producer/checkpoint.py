"""The producer's durable position in a vCenter's event stream, kept in Redis.

Per vCenter (keyed by its instance UUID, see :mod:`vebaq.core.keys`) two keys:

``checkpoint``
    JSON ``{"key", "created", "floor", "updated"}`` of the last event whose enqueue Redis
    confirmed.
``published``
    sorted set of recently published event keys, scored by creation time: on restart the
    producer re-reads from the checkpoint time (minus :data:`OVERLAP`) and skips these keys.

Both are written by one Lua script (atomic) *after* the batch's tasks were enqueued, so the
checkpoint never runs ahead of the queue.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis

from producer.lease import Lease
from vebaq.core import keys
from vebaq.core.redisdb import Script

#: Re-read this much before the checkpoint on restart: vCenter's timestamps are not strictly
#: ordered by key, and an overlap costs only duplicates that are recognised by key.
OVERLAP = timedelta(seconds=10)


#: Atomically: check the lease (if a holder is given), add the published keys, trim the window,
#: write the checkpoint. A script, not WATCH: lease renewals would abort a WATCH transaction.
_COMMIT = Script("""
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 4, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('SET', KEYS[3], ARGV[2])
return 1
""")


class LeaseLost(Exception):
    """Another producer holds the lease now; this one must not move the checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """:param key: the last enqueued event; :param created: its creation time;
    :param floor: events created before this were never the producer's (it first started
    then, without a checkpoint); :param updated: when this was written (epoch seconds)."""

    key: int
    created: datetime
    floor: datetime
    updated: float


class CheckpointStore:
    """Checkpoint and published-key window of one vCenter.

    :param retention: seconds of published keys to keep (the checkpoint ``maxAge``).
    """

    def __init__(self, r: redis.Redis, instance_uuid: str, retention: float) -> None:
        self.redis = r
        self.key = keys.checkpoint(instance_uuid)
        self.published_key = keys.published(instance_uuid)
        self.epoch_key = keys.key_epoch(instance_uuid)
        self.retention = retention

    def load(self) -> Checkpoint | None:
        raw = self.redis.get(self.key)
        if raw is None:
            return None
        data = json.loads(raw)
        created = datetime.fromisoformat(data["created"])
        return Checkpoint(int(data["key"]), created,
                          datetime.fromisoformat(data.get("floor") or data["created"]),
                          float(data["updated"]))

    def resume_from(self, vcenter_now: datetime) -> tuple[datetime, datetime, Checkpoint | None]:
        """``(begin, floor, checkpoint)``: read from the checkpoint minus the overlap (``begin``),
        and return no event created before that nor before the first start (``floor``; a
        simulator ignores the collector's time filter); neither earlier than ``retention``
        before vCenter's clock. Without a checkpoint both are vCenter's now."""
        checkpoint = self.load()
        if checkpoint is None:
            return vcenter_now, vcenter_now, None
        begin = max(checkpoint.created - OVERLAP, vcenter_now - timedelta(seconds=self.retention))
        return begin, max(checkpoint.floor, begin), checkpoint

    def start_new_key_epoch(self) -> int:
        """The vCenter numbers its events anew: forget the published keys and return the new
        key epoch (see :func:`producer.cloudevent.event_id`)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.published_key)
        pipe.incr(self.epoch_key)
        return int(pipe.execute()[1])

    def key_epoch(self) -> int:
        return int(self.redis.get(self.epoch_key) or 0)

    def published_since(self, since: datetime) -> list[int]:
        return [int(k) for k in self.redis.zrangebyscore(self.published_key, since.timestamp(),
                                                         "+inf")]

    def commit(self, events: list[tuple[int, datetime]], floor: datetime,
               fence: Lease | None = None) -> Checkpoint:
        """Record ``(key, created)`` pairs as published; the last one becomes the checkpoint.

        :param floor: the reader's floor, kept for the next start.
        :param fence: write only while this lease is ours, else raise :class:`LeaseLost`."""
        key, created = events[-1]
        now = time.time()
        record = json.dumps({"key": key, "created": created.astimezone(UTC).isoformat(),
                             "floor": floor.astimezone(UTC).isoformat(), "updated": now})
        trim_below = max(c for _, c in events).timestamp() - self.retention
        scored = [value for k, c in events for value in (c.timestamp(), str(k))]
        written = _COMMIT(
            self.redis, keys=[fence.key if fence else self.key, self.published_key, self.key],
            args=[fence.holder if fence else "", record, trim_below, *scored])
        if not written:
            raise LeaseLost(fence.key if fence else self.key)
        return Checkpoint(key, created, floor, now)
