"""Throttling per key: at most one task per key and window, or one task for N events.

A trigger with ``throttle:`` (:class:`~vebaq.core.routing.Throttle`) does not send every event it
matches. Event-Driven Ansible's rulebooks have the same three ideas (``once_within``,
``once_after``, ``accumulate_within``); Knative and EventBridge have none (a function would keep
its own state). Modes, each per *key* (the values of the throttle's paths, e.g. the host's
moref ``data.Host.Host.Value``):

``once_within: 5m``
    the first event passes; the key's later events are suppressed until 5 minutes (of event
    time) after the one that passed.
``once_after: 5m``
    an event passes only if its key had no event at all (sent or suppressed) in the 5 minutes
    before it: the first of each burst, once the key was quiet.
``batch: 10`` (``within: 1h``)
    events are held until the key has 10, then one task carries them all; fewer are sent once
    ``within`` passed since the batch's first event (the producer checks every second, by its
    clock against the first event's time), so a key that goes quiet never keeps events
    forever. The batch's task is a CloudEvent of its own: ``type`` :data:`BATCH_TYPE`, the last
    event's ``source``/``subject``/``time`` (so the pool's functions for that subject get it),
    the extension ``vebaqtrigger`` (the trigger's name), ``id`` derived from the trigger and the
    first event's id, and ``data`` ``{"Trigger", "Key", "Count", "Events": [structured
    CloudEvents, oldest first]}``.

Time is the events' creation time (vCenter's clock), not the producer's: decisions depend on the
events only, so reading a backlog after an outage throttles it as it happened, not as it
arrived.

**State in Redis** (keys in :mod:`vebaq.core.keys`): per trigger and key, the time of the event
that passed (``once_within``), the last event's time (``once_after``) or the list of held events
(``batch``); shared by every producer on that Redis (a key that should be per vCenter names
``vcenteruuid`` among its paths), surviving restarts. Every decision is one Lua script per
batch of events, so check and update are atomic however many producers decide at once.

**Crash safety.** Deciding changes state before the tasks are enqueued; a producer killed in
between re-reads those events from its unmoved checkpoint and must decide them the same way, or
the first of a window would be suppressed by its own earlier pass (lost) or a batch be filled
twice. So each decision is also written to a *memo* (per vCenter: trigger + event id →
decision) in the same script, and an event decided before is given its recorded decision again.
A full batch moves to the *firing* hash in the same step; the producer sends what is there with
the batch it enqueues (or when a batch falls due), and removes it, and the memo of the batch's
events, only after the checkpoint moved past them (:meth:`ThrottleStore.settle`). Killed after
enqueueing and before settling, it sends them again: tasks have deterministic ids (the batch
task's too) and workers suppress the duplicates. So no decision is lost or doubled. The memo
holds about a batch of events and expires after :data:`MEMO_TTL` should settling fail.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from vebaq.core import keys
from vebaq.core.redisdb import Script
from vebaq.core.routing import Trigger

#: The ``type`` of a batch's CloudEvent.
BATCH_TYPE = "vebaq.batch.v1"

#: Namespace of batch CloudEvent ids: uuid5(NS, "<trigger>/<first event's id>").
BATCH_ID_NAMESPACE = uuid.UUID("3c1b4f0e-2a4d-5e6f-8a9b-7665626174c8")

#: Seconds state outlives its window (it is only garbage collection: decisions compare event
#: times), so that a producer catching up after a day's outage still sees what passed before.
STATE_SLACK = 86400

#: Seconds a memo lives if the producer never settles it (killed after the checkpoint).
MEMO_TTL = 86400

#: Decisions.
PASS, DROP, BATCHED, FIRED = "pass", "drop", "batched", "fired"

_DECIDE = Script("""
-- KEYS: memo, due, firing, then one state key per candidate.
-- ARGV: per candidate 7 values: memo field, mode, time ms, window ms, size, event JSON,
-- batch member; then the state TTL slack ms and the memo TTL ms.
local memo, due, firing = KEYS[1], KEYS[2], KEYS[3]
local n = (#ARGV - 2) / 7
local slack, memo_ttl = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
local out = {}
for i = 1, n do
  local a = (i - 1) * 7
  local field, mode = ARGV[a + 1], ARGV[a + 2]
  local t, window, size = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local state = KEYS[3 + i]
  local decision = redis.call('HGET', memo, field)
  if not decision then
    if mode == 'once_within' then
      local last = tonumber(redis.call('GET', state))
      if last == nil or t >= last + window or t < last then
        -- (t < last: an event older than the pass, read late: no window covers it)
        if last == nil or t > last then
          redis.call('SET', state, ARGV[a + 3], 'PX', window + slack)
        end
        decision = 'pass'
      else
        decision = 'drop'
      end
    elseif mode == 'once_after' then
      local last = tonumber(redis.call('GET', state))
      if last == nil or t - last >= window then decision = 'pass' else decision = 'drop' end
      if last == nil or t > last then
        redis.call('SET', state, ARGV[a + 3], 'PX', window + slack)
      end
    else
      local count = redis.call('RPUSH', state, ARGV[a + 6])
      redis.call('PEXPIRE', state, window + slack)
      local member = ARGV[a + 7]
      if count == 1 then redis.call('ZADD', due, t + window, member) end
      if count >= size then
        local events = redis.call('LRANGE', state, 0, -1)
        redis.call('DEL', state)
        redis.call('ZREM', due, member)
        local first = cjson.decode(events[1])['id']
        redis.call('HSET', firing, member .. '\\n' .. tostring(first), cjson.encode(events))
        decision = 'fired'
      else
        decision = 'batched'
      end
    end
    redis.call('HSET', memo, field, decision)
  end
  out[i] = decision
end
if n > 0 then redis.call('PEXPIRE', memo, memo_ttl) end
return out
""")

_FLUSH_DUE = Script("""
-- KEYS: due, firing. ARGV: now ms, the batch list keys' prefix.
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, member in ipairs(members) do
  local list = ARGV[2] .. member
  local events = redis.call('LRANGE', list, 0, -1)
  if #events > 0 then
    local first = cjson.decode(events[1])['id']
    redis.call('HSET', KEYS[2], member .. '\\n' .. tostring(first), cjson.encode(events))
  end
  redis.call('DEL', list)
  redis.call('ZREM', KEYS[1], member)
end
return #members
""")


@dataclass(frozen=True)
class Candidate:
    """An event a throttled trigger matched, waiting for its decision."""

    trigger: Trigger
    event: Mapping[str, Any]
    created_ms: int

    @property
    def key(self) -> str:
        return self.trigger.throttle.key_of(self.event)

    @property
    def memo_field(self) -> str:
        return f"{self.trigger.name}\n{self.event.get('id')}"


@dataclass(frozen=True)
class Batch:
    """A batch ready to send: its trigger's name and pool, its key, its events."""

    trigger: str
    pool: str
    key: str
    events: tuple[Mapping[str, Any], ...]
    field: str  # in the firing hash

    def cloudevent(self) -> dict[str, Any]:
        """The batch's structured CloudEvent (see the module docstring)."""
        first, last = self.events[0], self.events[-1]
        event = {
            "specversion": "1.0",
            "id": str(uuid.uuid5(BATCH_ID_NAMESPACE, f"{self.trigger}/{first.get('id')}")),
            "source": last.get("source"),
            "type": BATCH_TYPE,
            "subject": last.get("subject"),
            "datacontenttype": "application/json",
            "vebaqtrigger": self.trigger,
            "data": {"Trigger": self.trigger, "Key": self.key, "Count": len(self.events),
                     "Events": list(self.events)},
        }
        for name in ("time", "vcenteruuid"):
            if last.get(name):
                event[name] = last[name]
        return event


def _member(trigger: Trigger, key: str) -> str:
    return json.dumps([trigger.name, trigger.pool, key], ensure_ascii=False)


class ThrottleStore:
    """The throttles' state for the producer of one vCenter (``instance_uuid``)."""

    def __init__(self, r: redis.Redis, instance_uuid: str) -> None:
        self.redis = r
        self.memo = keys.throttle_memo(instance_uuid)

    def decide(self, candidates: Sequence[Candidate]) -> list[str]:
        """One decision per candidate (:data:`PASS`, :data:`DROP`, :data:`BATCHED`,
        :data:`FIRED`), made and recorded atomically; an event decided before gets the same."""
        if not candidates:
            return []
        state_keys, args = [], []
        for c in candidates:
            throttle = c.trigger.throttle
            key = c.key
            if throttle.mode == "batch":
                member = _member(c.trigger, key)
                state_keys.append(keys.throttle_batch(member))
                event_json = json.dumps(c.event, ensure_ascii=False)
            else:
                member, event_json = "", ""
                state_keys.append(keys.throttle_state(c.trigger.name, throttle.mode, key))
            args += [c.memo_field, throttle.mode, c.created_ms, int(throttle.window * 1000),
                     throttle.size, event_json, member]
        args += [STATE_SLACK * 1000, MEMO_TTL * 1000]
        answer = _DECIDE(self.redis, [self.memo, keys.THROTTLE_DUE, keys.THROTTLE_FIRING,
                                      *state_keys], args)
        return [d.decode() if isinstance(d, bytes) else str(d) for d in answer]

    def flush_due(self, now_ms: int) -> int:
        """Move the batches whose ``within`` ran out to the firing hash; how many."""
        return int(_FLUSH_DUE(self.redis, [keys.THROTTLE_DUE, keys.THROTTLE_FIRING],
                              [now_ms, keys.throttle_batch("")]))

    def firing(self) -> list[Batch]:
        """Every batch waiting to be sent (just filled, due, or left by a killed producer)."""
        batches = []
        for raw_field, raw_events in sorted(self.redis.hgetall(keys.THROTTLE_FIRING).items()):
            field = raw_field.decode()
            member = field.split("\n", 1)[0]
            trigger, pool, key = json.loads(member)
            events = tuple(json.loads(e) for e in json.loads(raw_events))
            batches.append(Batch(trigger, pool, key, events, field))
        return batches

    def settle(self, candidates: Iterable[Candidate], batches: Iterable[Batch]) -> None:
        """The checkpoint moved past these events, and these batches were sent: forget them."""
        fields = [c.memo_field for c in candidates]
        sent = [b.field for b in batches]
        with self.redis.pipeline(transaction=False) as pipe:
            if fields:
                pipe.hdel(self.memo, *fields)
            if sent:
                pipe.hdel(keys.THROTTLE_FIRING, *sent)
            pipe.execute()
