"""The event archive: every CloudEvent the producer hands over, kept in Redis for replays.

AWS EventBridge archives the events of a bus and replays a time range of them on demand; VEBA
could only re-read vCenter from its checkpoint (at most an hour back, once, on restart) and
Knative not at all. vebaq keeps every event the producer enqueued in a Redis stream, so that
``vebaq replay`` (:mod:`vebaq.core.replay`) can send last Tuesday's events through a fixed or a
new function without vCenter, whose own event retention is short and whose collectors cannot be
rewound across a restart.

Layout (keys in :mod:`vebaq.core.keys`), per vCenter instance UUID:

``stream``
    one entry per event, fields ``s`` (the subject) and ``e`` (the structured CloudEvent as
    JSON). Entry ids are the events' creation times in milliseconds (``<ms>-<seq>``), clamped
    to stay increasing: an id is never earlier than its event, and later only by how far vCenter
    returned events out of time order. A time range is therefore an id range (scanned up to
    :data:`ID_SLACK_MS` past its end); reads filter on the exact ``time``. An event whose id is
    later still (vCenter's clock stepped back by more than that) is missed by a range that ends
    within the step.
``meta`` / ``subjects``
    the archive's bytes, last id and source URL; events per subject. Kept by the same scripts
    that add and trim entries, so statistics and metrics never scan the stream.
``unsettled``
    ids of events archived but not yet checkpointed (see the guarantee below).

One stream per vCenter rather than one per deployment: each has a single writer (the producer
holding that vCenter's lease), so ids can follow that vCenter's event times, duplicates can be
recognised per vCenter, and one vCenter's burst does not trim another's history. A replay over
several vCenters merges their streams by id.

**The guarantee.** The producer archives a batch after Redis took its tasks and before it commits
the checkpoint (:meth:`producer.service.ProducerService._publish`); a batch is archived by one
script, all or nothing. So an archived event is one that was enqueued (to every pool its
triggers routed it to; an event no trigger routed is archived all the same, for a function added
later). Killed between enqueue and archive, the producer re-reads the batch from its unmoved
checkpoint, enqueues it again (workers suppress the duplicate tasks) and archives it once. Killed
between archive and checkpoint, it re-reads and archives the batch again — but the ids of events
archived and not yet checkpointed are kept in ``unsettled`` until the checkpoint is written
(:meth:`Archive.settle`), and :meth:`Archive.append` skips those ids: each event is in the
archive once. The set holds about one batch; it expires after :data:`UNSETTLED_TTL`.

**Bounds, and Redis' memory.** ``archive.maxAge``, ``maxEntries`` and ``maxBytes``
(:class:`~vebaq.core.config.ArchiveSettings`) are enforced by the append script itself: the
oldest entries go, exactly, in the same step that adds new ones, so the archive never exceeds
them. Only archive entries are ever trimmed: tasks, checkpoints, retries and dead letters are
never touched, and ``noeviction`` stays safe. The archive must not make enqueueing fail when
Redis fills up, so it trades its history for the queues' room: above :data:`HIGH_WATER` of
``maxmemory`` each append first sheds the oldest entries until Redis is back below it, and skips
archiving if it cannot get there (an empty archive, queues filling Redis). An enqueued event may
then be missing from the archive: the producer says so in a log line and in its metrics
(``vebaq_producer_archive_skipped_total``), and does the same if Redis refuses the append (out
of memory), still committing the checkpoint — the tasks matter more than their copy.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from vebaq.core import keys
from vebaq.core.config import ArchiveSettings
from vebaq.core.redisdb import Script

#: Bytes Redis spends per archived event beyond its JSON and subject (listpack fields, stream
#: nodes of about four ~900-byte events each, allocator rounding), measured with ``MEMORY USAGE``
#: (1,115–1,135 bytes per event of the built-in simulated source, 890 of them JSON and subject);
#: ``maxBytes`` counts them, so the archive's bytes track Redis' own figure.
ENTRY_OVERHEAD = 230
#: Fraction of Redis' ``maxmemory`` above which the archive sheds its oldest entries instead of
#: growing, leaving the rest for tasks.
HIGH_WATER = 0.8
#: Most entries one append trims (a lowered bound or a long outage is caught up over several
#: appends, so that one script never blocks Redis for long).
TRIM_LIMIT = 5000
#: Seconds the ``unsettled`` ids are kept without a new append: longer than the producer can
#: be down and still re-read an event (its checkpoint's ``maxAge`` is capped far below this).
UNSETTLED_TTL = 7 * 86400
#: Entries read per round trip.
READ_CHUNK = 500
#: How far an entry id can be later than its event's ``time`` (vCenter returning events out of
#: time order); a read with an end time scans this much further.
ID_SLACK_MS = 10 * 60 * 1000

# KEYS: stream, meta, subjects, unsettled, sources.
# ARGV: 1 instance uuid, 2 source, 3 now (ms), 4 max age (ms), 5 max entries, 6 max bytes,
#       7 high water, 8 entry overhead, 9 unsettled ttl, 10 trim limit,
#       then per event: id, created (ms), subject, JSON.
# Returns {added, duplicates, trimmed, shed, skipped, length, bytes}, or {'oom'} when Redis is
# out of memory (nothing written: a script's first write would be refused anyway).
_APPEND = Script("""
local stream, meta, subjects, unsettled = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local min_ms = tonumber(ARGV[3]) - tonumber(ARGV[4])
local max_entries, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local high_water, overhead = tonumber(ARGV[7]), tonumber(ARGV[8])
local trim_limit = tonumber(ARGV[10])

local function memory()
  local info = redis.pcall('INFO', 'memory')
  if type(info) ~= 'string' then return 0, 0 end
  return tonumber(string.match(info, 'used_memory:(%d+)')) or 0,
         tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
end

local used, limit = memory()
if limit > 0 and used >= limit then return {'oom'} end

local fresh, duplicates, incoming, seen = {}, 0, 0, {}
for i = 11, #ARGV, 4 do
  local id = ARGV[i]
  if seen[id] or redis.call('SISMEMBER', unsettled, id) == 1 then
    duplicates = duplicates + 1
  else
    seen[id] = true
    local size = #ARGV[i + 2] + #ARGV[i + 3] + overhead
    table.insert(fresh, {id, tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], size})
    incoming = incoming + size
  end
end

local bytes = tonumber(redis.call('HGET', meta, 'bytes') or '0')
local length = redis.call('XLEN', stream)
local delta = {}  -- subject -> change in count

-- Remove oldest entries while keep_going(ms of the oldest) holds, at most `most`.
local function trim(keep_going, most)
  local removed = 0
  while removed < most do
    local chunk = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.min(500, most - removed))
    if #chunk == 0 then break end
    local last, stop = nil, false
    for _, entry in ipairs(chunk) do
      if not keep_going(tonumber(string.match(entry[1], '^(%d+)'))) then stop = true break end
      local size, subject, fields = overhead, '', entry[2]
      for f = 1, #fields, 2 do
        size = size + #fields[f + 1]
        if fields[f] == 's' then subject = fields[f + 1] end
      end
      bytes, length, removed, last = bytes - size, length - 1, removed + 1, entry[1]
      delta[subject] = (delta[subject] or 0) - 1
    end
    if last then
      local ms, seq = string.match(last, '^(%d+)-(%d+)$')
      redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
    end
    if stop then break end
  end
  return removed
end

local shed, skipped = 0, 0
if limit > 0 and #fresh > 0 and used + incoming > limit * high_water then
  local need, start = used + incoming - limit * high_water, bytes
  shed = trim(function() return start - bytes < need end, trim_limit)
  -- what the entries took is what trimming them frees (INFO would still count the copies
  -- this script just read)
  if used - (start - bytes) + incoming > limit * high_water then
    skipped, fresh = #fresh, {}
  end
end

local last = redis.call('HGET', meta, 'last')
if not last and redis.call('EXISTS', stream) == 1 then
  local info = redis.call('XINFO', 'STREAM', stream)
  for f = 1, #info, 2 do
    if info[f] == 'last-generated-id' then last = info[f + 1] end
  end
end
local last_ms, last_seq = -1, 0
if last then
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  last_ms, last_seq = tonumber(ms), tonumber(seq)
end
for _, event in ipairs(fresh) do
  if event[2] > last_ms then last_ms, last_seq = event[2], 0 else last_seq = last_seq + 1 end
  last = string.format('%d-%d', last_ms, last_seq)
  redis.call('XADD', stream, last, 's', event[3], 'e', event[4])
  redis.call('SADD', unsettled, event[1])
  bytes, length = bytes + event[5], length + 1
  delta[event[3]] = (delta[event[3]] or 0) + 1
end

local trimmed = trim(function(ms)
  return length > max_entries or bytes > max_bytes or ms < min_ms
end, math.max(trim_limit, 2 * #fresh))

for subject, change in pairs(delta) do
  if change ~= 0 and redis.call('HINCRBY', subjects, subject, change) <= 0 then
    redis.call('HDEL', subjects, subject)
  end
end
if length <= 0 then bytes = 0 end
redis.call('HSET', meta, 'bytes', bytes, 'source', ARGV[2])
if last then redis.call('HSET', meta, 'last', last) end
if #fresh > 0 then redis.call('EXPIRE', unsettled, tonumber(ARGV[9])) end
redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
return {#fresh, duplicates, trimmed, shed, skipped, length, bytes}
""")


@dataclass(frozen=True)
class Appended:
    """What one :meth:`Archive.append` did.

    :param added: events archived; :param duplicates: events skipped as already archived;
    :param trimmed: oldest entries removed to stay within the bounds; :param shed: oldest
        entries removed because Redis was above :data:`HIGH_WATER` of ``maxmemory``;
    :param skipped: events not archived because Redis stayed above it;
    :param out_of_memory: Redis is out of memory: nothing was archived.
    """

    added: int = 0
    duplicates: int = 0
    trimmed: int = 0
    shed: int = 0
    skipped: int = 0
    length: int = 0
    bytes: int = 0
    out_of_memory: bool = False


@dataclass(frozen=True)
class ArchivedEvent:
    """One archived event, as read back.

    :param position: its stream entry id (``<ms>-<seq>``); :param instance_uuid: its vCenter.
    """

    position: str
    instance_uuid: str
    subject: str
    event: dict[str, Any]
    created: datetime

    @property
    def order(self) -> tuple[int, int]:
        ms, _, seq = self.position.partition("-")
        return int(ms), int(seq)


@dataclass(frozen=True)
class ArchiveStats:
    """One vCenter's archive: events, bytes (as counted against ``maxBytes``), the ids' times of
    the oldest and newest event, and events per subject."""

    instance_uuid: str
    source: str
    length: int
    bytes: int
    oldest: datetime | None
    newest: datetime | None
    subjects: dict[str, int] = field(default_factory=dict)
    #: Redis' own figure (``MEMORY USAGE``), when asked for.
    memory: int | None = None


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _created(event: Mapping[str, Any], position: str) -> datetime:
    try:
        created = datetime.fromisoformat(str(event["time"]))
        return created if created.tzinfo else created.replace(tzinfo=UTC)
    except (KeyError, ValueError):
        return _from_ms(int(position.partition("-")[0]))


class Archive:
    """The archive in one Redis.

    :param settings: the bounds; :param unsettled_ttl: see :data:`UNSETTLED_TTL`.
    """

    def __init__(self, r: redis.Redis, settings: ArchiveSettings | None = None,
                 unsettled_ttl: float = UNSETTLED_TTL) -> None:
        self.redis = r
        self.settings = settings or ArchiveSettings()
        self.unsettled_ttl = unsettled_ttl

    # --- writing (the producer)

    def append(self, instance_uuid: str, source: str,
               events: Sequence[tuple[Mapping[str, Any], datetime]],
               now: float | None = None, encoded: Mapping[int, str] | None = None) -> Appended:
        """Archive ``(structured CloudEvent, creation time)`` pairs, in order, all or nothing;
        skips events already archived and not yet settled, and trims to the bounds.

        :param encoded: ``id(event)`` → the event's compact JSON where the caller has it already
            (the publisher's :func:`vebaq.core.publish.event_json`, the same text).

        Raises redis errors (``OutOfMemoryError`` is reported as ``out_of_memory`` instead)."""
        if not events:
            return Appended()
        bounds = self.settings
        args: list[object] = [
            instance_uuid, source,
            int((now if now is not None else datetime.now(UTC).timestamp()) * 1000),
            int(bounds.max_age * 1000), bounds.max_entries, bounds.max_bytes, HIGH_WATER,
            ENTRY_OVERHEAD, int(self.unsettled_ttl), TRIM_LIMIT]
        texts = encoded or {}
        for event, created in events:
            text = texts.get(id(event)) or json.dumps(event, separators=(",", ":"),
                                                      ensure_ascii=False)
            args += [str(event.get("id") or ""), _ms(created), str(event.get("subject") or ""),
                     text]
        try:
            result = _APPEND(self.redis, keys=self._keys(instance_uuid), args=args)
        except redis.exceptions.OutOfMemoryError:
            return Appended(out_of_memory=True)
        if result and result[0] == b"oom":
            return Appended(out_of_memory=True)
        return Appended(*(int(v) for v in result))

    def settle(self, instance_uuid: str, event_ids: Iterable[str]) -> None:
        """These events' checkpoint is written: they will not be sent again, so forget them."""
        ids = [i for i in event_ids if i]
        if ids:
            self.redis.srem(keys.archive_unsettled(instance_uuid), *ids)

    @staticmethod
    def _keys(instance_uuid: str) -> list[str]:
        return [keys.archive(instance_uuid), keys.archive_meta(instance_uuid),
                keys.archive_subjects(instance_uuid), keys.archive_unsettled(instance_uuid),
                keys.ARCHIVE_SOURCES]

    # --- reading (replays, statistics, metrics)

    def sources(self) -> dict[str, str]:
        """vCenter instance UUID → source URL, of every vCenter with an archive."""
        return {_text(k): _text(v) for k, v in self.redis.hgetall(keys.ARCHIVE_SOURCES).items()}

    def read(self, instance_uuid: str, since: datetime | None = None,
             until: datetime | None = None, subjects: Iterable[str] | None = None,
             after: str | None = None) -> Iterator[ArchivedEvent]:
        """One vCenter's events created in ``[since, until]`` (``None``: open), of the given
        subjects (``None``: all), in archive order; ``after``: only entries after this
        position."""
        wanted = {s.encode() for s in subjects} if subjects is not None else None
        stream = keys.archive(instance_uuid)
        start = f"({after}" if after else (str(_ms(since)) if since else "-")
        end = str(_ms(until) + ID_SLACK_MS) if until else "+"
        while True:
            chunk = self.redis.xrange(stream, start, end, count=READ_CHUNK)
            for raw_id, fields in chunk:
                if wanted is not None and fields.get(b"s") not in wanted:
                    continue
                position = _text(raw_id)
                event = json.loads(fields[b"e"])
                created = _created(event, position)
                if (since and created < since) or (until and created > until):
                    continue
                yield ArchivedEvent(position, instance_uuid, _text(fields.get(b"s", b"")),
                                    event, created)
            if len(chunk) < READ_CHUNK:
                return
            start = f"({_text(chunk[-1][0])}"

    def read_all(self, instance_uuids: Iterable[str], since: datetime | None = None,
                 until: datetime | None = None,
                 subjects: Iterable[str] | None = None) -> Iterator[ArchivedEvent]:
        """:meth:`read` over several vCenters, merged in time (entry id) order."""
        subjects = list(subjects) if subjects is not None else None
        streams = [self.read(u, since, until, subjects) for u in sorted(instance_uuids)]
        return heapq.merge(*streams, key=lambda e: e.order)

    def stats(self, instance_uuid: str, memory: bool = False) -> ArchiveStats:
        """One vCenter's statistics, from the bookkeeping (no scan); ``memory``: also ask Redis
        what the stream takes (``MEMORY USAGE``, which walks the stream)."""
        stream = keys.archive(instance_uuid)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.hgetall(keys.archive_meta(instance_uuid))
        pipe.hgetall(keys.archive_subjects(instance_uuid))
        pipe.xrange(stream, "-", "+", count=1)
        pipe.xrevrange(stream, "+", "-", count=1)
        length, meta, subjects, first, last = pipe.execute()
        usage = None
        if memory:
            try:
                usage = int(self.redis.memory_usage(stream, samples=0) or 0)
            except redis.ResponseError:  # a Redis without MEMORY (the embedded dev broker)
                usage = None

        def moment(entries: list) -> datetime | None:
            return _from_ms(int(_text(entries[0][0]).partition("-")[0])) if entries else None

        return ArchiveStats(
            instance_uuid, _text(meta.get(b"source", b"")), int(length),
            int(meta.get(b"bytes", 0)), moment(first), moment(last),
            {_text(k): int(v) for k, v in subjects.items()}, usage)
