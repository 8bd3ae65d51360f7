"""Who reads which vCenter, how it is doing, how far along: read from Redis for ``vebaq status``.

Everything comes from what the producers keep there anyway: the leases (who reads a vCenter;
:mod:`producer.lease`), the heartbeat set and each producer's state record (its vCenters' state
and lag as of its last beat; :mod:`producer.membership`), the checkpoints
(:mod:`producer.checkpoint`, found by instance UUID through
:data:`vebaq.core.keys.VCENTER_INSTANCES`). Nothing asks the producers themselves, so it works
from any host that reaches Redis, and also shows vCenters nobody reads now.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from producer.checkpoint import CheckpointStore
from producer.lease import vcenter_scope
from vebaq.core import keys
from vebaq.core.config import VCenterSettings


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def read(r: redis.Redis, vcenters: Sequence[VCenterSettings]) -> dict[str, Any]:
    """``{"producers": [...], "vcenters": [...]}``: the configured vCenters (and any other one
    a lease names) with their reader, state, lag and checkpoint; the live producers."""
    seconds, micros = r.time()
    now = seconds + micros / 1e6
    beats = dict(r.zrange(keys.PRODUCERS, 0, -1, withscores=True))
    records: dict[str, dict] = {}
    for member, raw in zip(beats, r.mget([keys.producer_state(_text(m)) for m in beats])
                           if beats else [], strict=True):
        if raw:
            records[_text(member)] = json.loads(raw)
    configured = {vcenter_scope(vc.url): vc.url for vc in vcenters if vc.url}
    leased = [_text(k).removeprefix(keys.LEASE_PREFIX)
              for k in r.scan_iter(match=f"{keys.LEASE_PREFIX}*", count=1000)]
    instances = {_text(k): _text(v) for k, v in r.hgetall(keys.VCENTER_INSTANCES).items()}

    rows = []
    for scope in [*configured, *sorted(set(leased) - set(configured))]:
        lease_key = keys.lease(scope)
        holder, ttl_ms = _text(r.get(lease_key)), r.pttl(lease_key)
        reported = next((v for v in (records.get(holder) or {}).get("vcenters", {}).values()
                         if v.get("scope") == scope), None) if holder else None
        uuid = (reported or {}).get("instance_uuid") or instances.get(scope)
        checkpoint = CheckpointStore(r, uuid, 0).load() if uuid else None
        if holder is None:
            state = "unassigned: no producer reads it"
        elif reported is None:
            state = "read (no state reported yet)"
        else:
            state = reported["state"]
        rows.append({
            "url": configured.get(scope, scope), "scope": scope, "configured": scope in configured,
            "reader": holder, "lease_expires_in": ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else None,
            "state": state, "lag_seconds": (reported or {}).get("lag_seconds"),
            "instance_uuid": uuid,
            "checkpoint": None if checkpoint is None else {
                "key": checkpoint.key, "created": checkpoint.created.isoformat(),
                "updated": checkpoint.updated, "age_seconds": max(0.0, now - checkpoint.updated)},
        })
    producers = []
    for member, beat in sorted(beats.items(), key=lambda kv: _text(kv[0])):
        pid = _text(member)
        record = records.get(pid, {})
        producers.append({
            "id": pid, "host": record.get("host"), "pid": record.get("pid"),
            "heartbeat_age_seconds": max(0.0, now - beat), "started": record.get("started"),
            "share": record.get("share"), "live_producers": record.get("live_producers"),
            "reading": sorted(record.get("vcenters", {}))})
    return {"producers": producers, "vcenters": rows}
