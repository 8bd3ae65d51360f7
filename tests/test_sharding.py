"""Sharing vCenters out: the heartbeat set on real Redis, each producer's share, the health of a
process reading several vCenters, and ``vebaq status`` reading it all back from Redis."""

from __future__ import annotations

import json
import time

import pytest
import redis

from producer import membership, status
from producer.checkpoint import CheckpointStore
from producer.lease import Lease, vcenter_scope
from producer.membership import Membership, share
from producer.metrics import STALL_SECONDS, ProducerMetrics
from vebaq.core import keys
from vebaq.core.config import VCenterSettings

URLS = ["https://vc01.example.com/sdk", "https://vc02.example.com/sdk",
        "https://vc03.example.com/sdk"]


@pytest.mark.parametrize(("vcenters", "live", "expected"), [
    (3, 1, 3), (3, 2, 2), (3, 3, 1), (3, 4, 1), (1, 2, 1), (10, 3, 4), (0, 2, 0), (5, 0, 5)])
def test_each_producer_reads_at_most_its_share(vcenters: int, live: int, expected: int) -> None:
    assert share(vcenters, live) == expected


def test_producers_count_each_other_and_the_silent_drop_out(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "HEARTBEAT_TTL", 1.0)
    a, b = Membership(redis_client, "host-a:1:aaaa"), Membership(redis_client, "host-b:2:bbbb")
    assert a.beat({"id": "a"}) == 1
    assert b.beat({"id": "b"}) == 2
    assert a.beat({"id": "a"}) == 2
    assert json.loads(redis_client.get(keys.producer_state("host-b:2:bbbb"))) == {"id": "b"}
    assert 0 < redis_client.pttl(keys.producer_state("host-b:2:bbbb")) <= \
        membership.STATE_TTL * 1000
    time.sleep(1.3)  # b falls silent (killed): counted out after HEARTBEAT_TTL
    assert a.beat({"id": "a"}) == 1
    assert b.beat({"id": "b"}) == 2  # back
    b.leave()  # a clean stop: at once
    assert a.beat({"id": "a"}) == 1
    assert not redis_client.exists(keys.producer_state("host-b:2:bbbb"))


def test_one_lease_per_vcenter_whatever_the_spelling(redis_client: redis.Redis) -> None:
    first = Lease(redis_client, vcenter_scope("https://VC01.example.com:443/sdk/"), holder="a")
    second = Lease(redis_client, vcenter_scope("https://vc01.example.com/sdk"), holder="b")
    assert first.key == second.key == keys.lease("https://vc01.example.com/sdk")
    try:
        assert first.try_acquire()
        assert not second.try_acquire()
        assert second.current_holder() == "a"
        first.release()
        assert second.try_acquire()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()


def metrics_with(*states: str) -> ProducerMetrics:
    """Metrics of a producer with one vCenter per state: ``ok``, ``down`` (logged out),
    ``standby`` (read by another producer)."""
    metrics = ProducerMetrics("me")
    for url, state in zip(URLS, states, strict=False):
        vc = metrics.vcenter(url)
        vc.held = state != "standby"
        vc.holder = "me" if vc.held else "other:1:x"
        vc.connected = state == "ok"
        vc.last_poll_at = time.time()
        vc.last_poll_error = "VCenterError: connection refused" if state == "down" else None
    return metrics


def test_health_with_one_vcenter_is_as_before() -> None:
    assert metrics_with("ok").health() == (True, "ok")
    assert metrics_with("standby").health() == (True, "ok")
    healthy, body = metrics_with("down").health()
    assert not healthy
    assert body == "degraded: not logged in to vCenter (VCenterError: connection refused)"


def test_one_vcenter_down_among_several_is_not_a_reason_to_restart() -> None:
    metrics = metrics_with("ok", "down", "standby")
    healthy, body = metrics.health()
    lines = body.splitlines()
    assert healthy
    down = "degraded: not logged in to vCenter (VCenterError: connection refused)"
    assert lines == [f"degraded: 1 of the 2 vCenter(s) read here: {URLS[1]}: {down}",
                     f"{URLS[0]}: ok", f"{URLS[1]}: {down}",
                     f"{URLS[2]}: standby: read by other:1:x"]
    strict, strict_body = metrics.health(strict=True)
    assert not strict and strict_body == body
    assert metrics.problem() is None and metrics.healthy()


def test_every_vcenter_read_here_down_or_the_loop_stalled_fails_the_probe() -> None:
    healthy, body = metrics_with("down", "down", "standby").health()
    assert not healthy and body.startswith("degraded: 2 of the 2 vCenter(s) read here")
    assert metrics_with("ok", "ok", "ok").health() == (
        True, "\n".join(["ok: reading 3 of 3 vCenter(s)", *(f"{u}: ok" for u in URLS)]))
    assert metrics_with("standby", "standby", "standby").health()[0]
    stalled = metrics_with("ok", "ok")
    stalled.heartbeat -= STALL_SECONDS + 1
    assert stalled.health()[0] is False
    assert stalled.problem().startswith("stalled: the producer loop has not run for")
    one_stalled = metrics_with("ok", "ok")
    one_stalled.vcenters[URLS[1]].heartbeat -= STALL_SECONDS + 1
    healthy, body = one_stalled.health(strict=True)
    assert not healthy and f"{URLS[1]}: stalled: the producer loop has not run" in body


def test_every_metric_names_its_vcenter() -> None:
    from prometheus_client import generate_latest

    metrics = metrics_with("ok", "down")
    for vc in metrics.vcenters.values():
        vc.events_read.inc(2)
        vc.published.labels(pool="echo").inc()
        vc.caught_up(time.time() - 1.5)
    text = generate_latest(metrics.registry).decode()
    for url in URLS[:2]:
        assert f'vebaq_producer_events_read_total{{vcenter="{url}"}} 2.0' in text
        assert f'vebaq_producer_tasks_published_total{{pool="echo",vcenter="{url}"}} 1.0' in text
        assert f'vebaq_producer_vcenter_held{{vcenter="{url}"}} 1.0' in text
        assert f'vebaq_producer_lag_seconds{{vcenter="{url}"}} 1.' in text
    assert f'vebaq_producer_vcenter_healthy{{vcenter="{URLS[1]}"}} 0.0' in text
    assert 'vebaq_producer_info{producer="me"} 1.0' in text
    unlabelled = [line for line in text.splitlines() if line.startswith("vebaq_producer_")
                  and "{" not in line.split(" ")[0]]
    assert sorted(line.split(" ")[0] for line in unlabelled) == [
        "vebaq_producer_lease_share", "vebaq_producer_live_producers"]
    stats = metrics.stats()
    assert stats["celery"]["published_per_pool"] == {"echo": 2}
    assert stats["vcenters"][URLS[0]]["published_per_pool"] == {"echo": 1}
    assert stats["vcenter"]["events_read"] == 4


def test_status_reads_readers_state_lag_and_checkpoints(redis_client: redis.Redis) -> None:
    from datetime import UTC, datetime

    vcenters = [VCenterSettings(url=url) for url in URLS]
    store = CheckpointStore(redis_client, "uuid-1", 3600)
    store.commit([(41, datetime.now(UTC))], datetime.now(UTC))
    redis_client.hset(keys.VCENTER_INSTANCES, vcenter_scope(URLS[0]), "uuid-1")
    lease = Lease(redis_client, vcenter_scope(URLS[1]), holder="host-a:1:aaaa")
    stranger = Lease(redis_client, "https://elsewhere.example.com/sdk", holder="host-a:1:aaaa")
    assert lease.try_acquire() and stranger.try_acquire()
    try:
        Membership(redis_client, "host-a:1:aaaa").beat({
            "id": "host-a:1:aaaa", "host": "host-a", "pid": 1, "share": 2, "live_producers": 1,
            "vcenters": {URLS[1]: {"scope": vcenter_scope(URLS[1]), "state": "ok",
                                   "lag_seconds": 0.4, "instance_uuid": "uuid-2"}}})
        found = status.read(redis_client, vcenters)
    finally:
        lease.release()
        stranger.release()
    one, two, three, other = found["vcenters"]
    assert (one["reader"], one["state"], one["checkpoint"]["key"], one["instance_uuid"]) == (
        None, "unassigned: no producer reads it", 41, "uuid-1")
    assert (two["reader"], two["state"], two["lag_seconds"], two["instance_uuid"]) == (
        "host-a:1:aaaa", "ok", 0.4, "uuid-2")
    assert 0 < two["lease_expires_in"] <= 10
    assert three["checkpoint"] is None and three["configured"]
    assert (other["url"], other["configured"], other["state"]) == (
        "https://elsewhere.example.com/sdk", False, "read (no state reported yet)")
    (producer,) = found["producers"]
    assert (producer["id"], producer["host"], producer["reading"], producer["share"]) == (
        "host-a:1:aaaa", "host-a", [URLS[1]], 2)
    assert producer["heartbeat_age_seconds"] < 5
