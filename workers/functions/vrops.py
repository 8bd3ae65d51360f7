"""The ``vrops`` pool: mirrors host maintenance mode into vRealize Operations (see issue 3).

``EnteredMaintenanceModeEvent`` marks the host's vROps resource as maintained (``PUT``),
``ExitMaintenanceModeEvent`` unmarks it (``DELETE``). The host is identified by its name and moref
(``data["Host"]``) and its vCenter's instance UUID (the ``vcenteruuid`` extension attribute).

Retries and parallel workers reorder events, so vROps must end in the state of the *latest*
vCenter event per host, not of the last one processed. Per ``(vCenter, host)`` the worker keeps
the order — ``(key epoch, key, time)`` — of the latest event applied
(:func:`vebaq.core.keys.vrops_applied`), and under a short per-host Redis lock
(:func:`vebaq.core.keys.vrops_lock`) does: skip the event if it is not newer than the applied one
("stale" or "already applied"), call vROps, record it (a Lua compare-and-set, which only moves
forward). An event therefore causes at most one
``PUT``/``DELETE`` once it succeeded, and an older event never overrides a newer one.

The key epoch (the ``vcenterkeyepoch`` extension, absent: 0) is bumped by the producer when a
vCenter starts numbering its events anew (restored from a backup, reinstalled): the new events
have *lower* keys than those applied before, and compared by key alone they would all be skipped
as stale, leaving vROps in the state of before the restore. Compared epoch first, any event of a
newer epoch wins and a late event of an older epoch is stale. Records written before epochs
existed have no ``key_epoch`` field and read as epoch 0, as do events without the attribute
(queued before the upgrade, or from a vCenter never renumbered). Creation time is only the last
tie-breaker: vCenter's clock may step back (a restore does that too), the key never within an
epoch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from cloudevents.core.v1.event import CloudEvent
from redis.exceptions import LockError

from vebaq.core import keys, redisdb
from vebaq.core.config import VropsSettings
from vebaq.core.envelope import KEY_EPOCH_ATTRIBUTE
from vebaq.core.errors import PermanentError
from vebaq.core.redisdb import Script
from workers.pools import function
from workers.settings import settings
from workers.vrops_client import VropsClient

logger = logging.getLogger("vebaq.vrops")

#: Event subject → whether the host is maintained afterwards.
MAINTAINED_AFTER = {"EnteredMaintenanceModeEvent": True, "ExitMaintenanceModeEvent": False}

# Per host, :func:`vebaq.core.keys.vrops_applied` is a hash with the latest event applied:
# ``key_epoch`` (absent from records written before key epochs: 0), ``key`` (the vCenter event
# key), ``time`` (µs since 1970), ``id``, ``subject``, ``maintained`` (``1``/``0``) and the vROps
# ``resource`` id; :func:`vebaq.core.keys.vrops_lock`
# serialises "check stale → call vROps → record applied".

#: Seconds an applied record is kept: far longer than any retry or redelivery of an older event.
APPLIED_TTL = 30 * 24 * 3600

#: HTTP calls an event may make while it holds the lock (token, 401 and re-acquire, lookup, mark,
#: 404 and re-lookup): the lock outlives them all, each bounded by the vROps timeout.
CALLS_UNDER_LOCK = 6

#: Extra seconds of lock lifetime beyond those calls (Redis round trips, scheduling).
LOCK_SLACK = 5.0

#: Compare-and-set of the applied record; returns ``{1}`` if recorded, else ``{0, maintained}``
#: of the record that is as new or newer. Order: ``(key_epoch, key, time)``, a record without
#: ``key_epoch`` being epoch 0.
_RECORD = Script("""
local t = tonumber(ARGV[1])
local k = tonumber(ARGV[2])
local e = tonumber(ARGV[8])
local current = redis.call('HMGET', KEYS[1], 'time', 'key', 'maintained', 'key_epoch')
if current[1] then
  local ct = tonumber(current[1])
  local ck = tonumber(current[2])
  local ce = tonumber(current[4]) or 0
  if e < ce or (e == ce and (k < ck or (k == ck and t <= ct))) then
    return {0, current[3]}
  end
end
redis.call('HSET', KEYS[1], 'time', ARGV[1], 'key', ARGV[2], 'id', ARGV[3],
           'maintained', ARGV[4], 'subject', ARGV[5], 'resource', ARGV[6], 'key_epoch', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return {1}
""")

#: Outcomes :func:`maintenance_mode` returns.
APPLIED, STALE, DUPLICATE = "applied", "stale", "duplicate"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_clients: dict[tuple[int, VropsSettings], VropsClient] = {}
_clients_lock = threading.Lock()


class HostBusy(Exception):
    """Another worker held the host's lock for longer than expected; retried later."""


@dataclass(frozen=True)
class HostEvent:
    """What the pool needs from a maintenance-mode CloudEvent.

    :param time_us: the event's creation time (CloudEvent ``time``) in µs since the epoch.
    :param key: the vCenter event key (``data["Key"]``): the order of events of one vCenter
        within one key epoch.
    :param key_epoch: the ``vcenterkeyepoch`` extension (0 if absent): bumped when the vCenter
        numbers its events anew, so it orders before the key.
    """

    subject: str
    event_id: str
    host_name: str
    moref: str
    vc_uuid: str
    maintained: bool
    time_us: int
    key: int
    key_epoch: int = 0

    @property
    def order(self) -> tuple[int, int, int]:
        # vCenter allocates event keys in creation order, per vCenter (the record is per
        # vCenter and host), so the key orders events even if vCenter's clock steps back; a
        # vCenter numbering anew starts a new epoch, whose events all come after.
        return self.key_epoch, self.key, self.time_us

    def describe(self) -> str:
        epoch = f" (key epoch {self.key_epoch})" if self.key_epoch else ""
        return f"{self.subject} {self.key}{epoch} for {self.host_name} ({self.moref})"


def host_event(event: CloudEvent) -> HostEvent:
    """Read a :class:`HostEvent`; raises :class:`PermanentError` saying what is missing."""
    subject = event.get_subject() or ""
    if subject not in MAINTAINED_AFTER:
        raise PermanentError(f"vrops: cannot handle subject {subject!r} "
                             f"(expected {' or '.join(MAINTAINED_AFTER)})")
    data: Any = event.get_data()
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError:
            data = None
    if not isinstance(data, dict):
        raise PermanentError(f"vrops: {subject} {event.get_id()} has no JSON object data")
    host = data.get("Host")
    ref = host.get("Host") if isinstance(host, dict) else None
    name = host.get("Name") if isinstance(host, dict) else None
    moref = ref.get("Value") if isinstance(ref, dict) else None
    if not isinstance(name, str) or not name or not isinstance(moref, str) or not moref:
        raise PermanentError(f"vrops: {subject} {event.get_id()} names no host "
                             f"(expected data.Host.Name and data.Host.Host.Value)")
    key = data.get("Key")
    if not isinstance(key, int) or isinstance(key, bool):
        raise PermanentError(f"vrops: {subject} {event.get_id()} has no integer data.Key")
    vc_uuid = event.get_extension("vcenteruuid")
    if not isinstance(vc_uuid, str) or not vc_uuid:
        raise PermanentError(f"vrops: {subject} {event.get_id()} has no vcenteruuid attribute "
                             f"(the vCenter instance UUID, set by the producer)")
    created = event.get_time()
    if not isinstance(created, datetime):
        raise PermanentError(f"vrops: {subject} {event.get_id()} has no time attribute")
    time_us = (created - _EPOCH) // timedelta(microseconds=1)
    return HostEvent(subject, event.get_id(), name, moref, vc_uuid.lower(),
                     MAINTAINED_AFTER[subject], time_us, key, _key_epoch(event, subject))


def _key_epoch(event: CloudEvent, subject: str) -> int:
    """The ``vcenterkeyepoch`` extension: 0 if absent; an integer ≥ 0, or its decimal text (what
    binary-mode HTTP makes of it); anything else is a :class:`PermanentError`."""
    value = event.get_extension(KEY_EPOCH_ATTRIBUTE)
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PermanentError(f"vrops: {subject} {event.get_id()} has a bad {KEY_EPOCH_ATTRIBUTE} "
                             f"attribute {value!r} (expected a whole number ≥ 0)")
    return value


def client(settings: VropsSettings) -> VropsClient:
    """The process's client for ``settings`` (its token and resource ids are reused)."""
    if not settings.url or not settings.username or not settings.password:
        raise PermanentError("vROps is not configured: set VROPS_URL, VROPS_USER and "
                             "VROPS_PASSWORD (or vropsFqdn, vropsUser and vropsPassword, or the "
                             "vrops: section of the config file)")
    key = (os.getpid(), settings)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = VropsClient(settings)
        return _clients[key]


def reset_clients() -> None:
    """Forget the cached clients (tests; a changed configuration)."""
    with _clients_lock:
        for vrops in _clients.values():
            vrops.close()
        _clients.clear()


def applied(r: redis.Redis, vc_uuid: str, moref: str) -> dict[str, str]:
    """The applied record of a host (empty if none): ``key_epoch``, ``key``, ``time``, ``id``,
    ``maintained`` …"""
    raw = r.hgetall(keys.vrops_applied(vc_uuid.lower(), moref))
    return {k.decode(): v.decode() for k, v in raw.items()}


def _skip_reason(r: redis.Redis, host: HostEvent) -> str | None:
    """``STALE`` or ``DUPLICATE`` if an event as new or newer was applied already."""
    record = applied(r, host.vc_uuid, host.moref)
    if not record:
        return None
    order = (int(record.get("key_epoch") or 0), int(record["key"]), int(record["time"]))
    if order == host.order:
        return DUPLICATE
    return STALE if order > host.order else None


def _record(r: redis.Redis, host: HostEvent, resource_id: str) -> tuple[bool, bool | None]:
    """Record ``host`` as applied unless a newer one is; returns ``(recorded, newer's state)``."""
    result = _RECORD(r, keys=[keys.vrops_applied(host.vc_uuid, host.moref)],
                     args=[host.time_us, host.key, host.event_id, int(host.maintained),
                           host.subject, resource_id, APPLIED_TTL, host.key_epoch])
    if int(result[0]) == 1:
        return True, None
    newer = result[1].decode() if isinstance(result[1], bytes) else result[1]
    return False, newer == "1"


def _log_skip(host: HostEvent, reason: str) -> None:
    if reason == STALE:
        logger.info("vrops: %s: stale, skipped (a later event for this host was applied)",
                    host.describe())
    else:
        logger.info("vrops: %s: already applied, skipped", host.describe())


@function(pool="vrops", subjects=list(MAINTAINED_AFTER), name="maintenance_mode")
def maintenance_mode(event: CloudEvent) -> str:
    """Mirror one maintenance-mode event into vROps; returns ``applied``, ``stale`` or
    ``duplicate``."""
    host = host_event(event)
    config = settings()
    vrops = client(config.vrops)
    r = redisdb.client(config.broker_url)

    reason = _skip_reason(r, host)  # fast path: the record only moves forward
    if reason:
        _log_skip(host, reason)
        return reason

    lock_timeout = CALLS_UNDER_LOCK * config.vrops.timeout + LOCK_SLACK
    lock = r.lock(keys.vrops_lock(host.vc_uuid, host.moref),
                  timeout=lock_timeout, blocking_timeout=lock_timeout, sleep=0.05)
    if not lock.acquire():
        raise HostBusy(f"vrops: {host.describe()}: host lock busy for {lock_timeout:g}s")
    try:
        reason = _skip_reason(r, host)
        if reason:
            _log_skip(host, reason)
            return reason
        resource_id = vrops.mark_host(host.host_name, host.moref, host.vc_uuid, host.maintained)
        recorded, newer_maintained = _record(r, host, resource_id)
        if not recorded:
            # Only when our lock expired mid-call: a newer event was applied meanwhile and our
            # call may have landed after it, so re-assert the newer state.
            logger.warning("vrops: %s: lock expired and a newer event was applied meanwhile; "
                           "re-applying its state", host.describe())
            if newer_maintained is not None and newer_maintained != host.maintained:
                vrops.set_maintained(resource_id, newer_maintained)
            return STALE
    finally:
        try:
            lock.release()
        except LockError:
            logger.warning("vrops: %s: host lock expired before release", host.describe())
    logger.info("vrops: %s: resource %s %s", host.describe(), resource_id,
                "marked maintained" if host.maintained else "unmarked (STARTED)")
    return APPLIED
