"""The reader's faults on real producer processes against the test peer, which pages like a
vCenter and has current govmomi's limits (a collector more than ``-collector-capacity`` events
behind goes stale silently; 32 collectors in all, freed only by ``DestroyCollector``).

Every test prints sent / handled (enqueued to the echo pool, counted by CloudEvent id) / lost /
duplicates (tasks enqueued twice for one event) and asserts lost = 0 and duplicates = 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from pyVmomi import vim

from producer.cloudevent import event_id
from tests.support import (
    CuttableProxy,
    Proc,
    Simulator,
    VCenter,
    all_enqueued,
    build_vcsim,
    free_port,
    post,
    producer_metric,
    report,
    start_producer,
    vebaq_argv,
    wait_until,
)

pytestmark = pytest.mark.slow

#: The peer's collector capacity in these tests: small, so that a burst of 10× it is quick.
CAPACITY = 100


def collectors(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/sdk") + "/vebaq/collectors",
                                timeout=10) as answer:
        return json.load(answer)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator(build_vcsim(), tmp_path, "-collector-capacity", str(CAPACITY))
    yield sim
    sim.stop()


@pytest.fixture
def env(stack_env: dict[str, str], peer: Simulator, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "vebaq.yaml"
    config.write_text("triggers: [{name: all, pool: echo}]\n")
    return {**stack_env, "VCENTER_URL": peer.url, "VEBAQ_CONFIG": str(config)}


def start(env: dict[str, str], log_dir: Path, name: str = "producer",
          metrics_port: int | None = None) -> Proc:
    if metrics_port is None:
        return start_producer(env, log_dir, name=name)
    proc = Proc(name, vebaq_argv("producer", "--metrics-port", str(metrics_port)), env, log_dir)
    proc.wait_for(r"reading vCenter", timeout=60)
    return proc


def test_steady_flow_with_a_producer_restart(env: dict[str, str], peer: Simulator,
                                            log_dir: Path, redis_client: redis.Redis) -> None:
    vcenter = VCenter(peer.url)
    producer = start(env, log_dir, name="producer-1")
    sent = []
    for batch in range(6):
        sent += post(vcenter, 25, f"steady {batch}")
        if batch == 2:
            producer.stop()
            sent += post(vcenter, 25, "while down")
            producer = start(env, log_dir, name="producer-2")
        time.sleep(0.3)
    wait_until(lambda: all_enqueued(redis_client, sent), 60, "every event enqueued")
    time.sleep(1)  # anything doubled would show up now
    producer.stop()
    assert report("steady + restart", sent, redis_client) == (0, 0)
    assert "collector stalled" not in producer.log()


@pytest.mark.parametrize("notifications", ["true", "false"])
def test_a_burst_of_ten_times_the_capacity_is_recovered(
        env: dict[str, str], peer: Simulator, log_dir: Path, redis_client: redis.Redis,
        notifications: str) -> None:
    """The whole burst lands while the producer does not read (it is stopped, as a producer
    busy elsewhere or a slow poll would be): its collector goes stale, silently."""
    vcenter = VCenter(peer.url)
    env = {**env, "VCENTER_NOTIFICATIONS": notifications}
    producer = start(env, log_dir, metrics_port=(port := free_port()))
    sent = post(vcenter, 5, "warm-up")
    wait_until(lambda: all_enqueued(redis_client, sent), 30, "the warm-up")
    producer.signal(signal.SIGSTOP)
    burst_started = time.monotonic()
    try:
        sent += _parallel_post(peer.url, 10 * CAPACITY, "burst")
    finally:
        producer.signal(signal.SIGCONT)
    wait_until(lambda: all_enqueued(redis_client, sent), 60, "every burst event enqueued")
    recovered = time.monotonic() - burst_started
    resets = producer_metric(port, "vebaq_collector_resets_total")
    producer.stop()
    print(f"\n[burst] {10 * CAPACITY} events (capacity {CAPACITY}), notifications "
          f"{notifications}: all enqueued {recovered:.1f}s after the burst began; collector "
          f"resets={resets:.0f}")
    assert report("burst 10x capacity", sent, redis_client) == (0, 0)
    assert resets >= 1 and "collector stalled" in producer.log()
    assert collectors(peer.url)["live"] == 0  # destroyed on shutdown


def test_the_session_killed_mid_burst(env: dict[str, str], peer: Simulator, log_dir: Path,
                                      redis_client: redis.Redis) -> None:
    admin = VCenter(peer.url, user="admin")
    producer = start(env, log_dir)
    sent = post(admin, 3, "warm-up")
    wait_until(lambda: all_enqueued(redis_client, sent), 30, "the warm-up")
    sent += post(admin, 300, "burst, first half")
    _terminate_sessions(admin, user=env["VCENTER_USER"])
    sent += post(admin, 300, "burst, second half")
    wait_until(lambda: all_enqueued(redis_client, sent), 60, "every event enqueued")
    producer.wait_for(r"vCenter session restored")
    producer.stop()
    assert report("session killed mid-burst", sent, redis_client) == (0, 0)


def test_fifty_dropped_connections_leave_one_collector(env: dict[str, str], peer: Simulator,
                                                       log_dir: Path,
                                                       redis_client: redis.Redis) -> None:
    """The producer's connection to vCenter is cut 50 times (a network blip, a load balancer
    reset): each time its session lives on in vCenter, with its collector. The producer must
    destroy that collector and log out before it logs in again, or the peer's count grows by one
    per cut and the 33rd login's collector fails with InvalidState, for good."""
    proxy = CuttableProxy(_address(peer.url))
    env = {**env, "VCENTER_URL": proxy.url(peer.url)}
    admin = VCenter(peer.url, user="admin")
    producer = start(env, log_dir)
    sent: list[str] = []
    counts = []
    try:
        for cut in range(50):
            batch = post(admin, 2, f"before cut {cut}")
            sent += batch
            wait_until(lambda b=batch: all_enqueued(redis_client, b), 30,
                       f"events before cut {cut}")
            proxy.cut()
            producer.wait_for(r"vCenter session restored", count=cut + 1, timeout=60)
            counts.append(collectors(peer.url)["live"])
        sent += post(admin, 2, "after the cuts")
        wait_until(lambda: all_enqueued(redis_client, sent), 60, "every event enqueued")
        producer.stop()
    finally:
        proxy.close()
    print(f"\n[50 dropped connections] live collectors after each reconnect: max {max(counts)}, "
          f"last {counts[-1]}; after shutdown {collectors(peer.url)['live']}")
    assert max(counts) == 1 and collectors(peer.url)["live"] == 0
    assert report("50 dropped connections", sent, redis_client) == (0, 0)


def test_a_hung_vcenter_is_noticed_reported_and_survived(
        env: dict[str, str], peer: Simulator, log_dir: Path, redis_client: redis.Redis) -> None:
    """vCenter accepts connections and requests and answers nothing (a hung vCenter, a
    half-open connection): the request timeout notices it, /healthz says degraded with the
    reason, every login attempt logs its failure, and nothing is lost once it answers again."""
    proxy = CuttableProxy(_address(peer.url))
    port = free_port()
    env = {**env, "VCENTER_URL": proxy.url(peer.url), "VCENTER_REQUEST_TIMEOUT": "2s"}
    admin = VCenter(peer.url, user="admin")
    producer = start(env, log_dir, metrics_port=port)
    try:
        sent = post(admin, 3, "before")
        wait_until(lambda: all_enqueued(redis_client, sent), 30, "events before the hang")
        assert health(port) == (200, "ok")
        proxy.hang()
        hung_at = time.monotonic()
        sent += post(admin, 5, "while hung")
        producer.wait_for(r"vCenter session lost \(TimeoutError", timeout=30)
        noticed = time.monotonic() - hung_at
        producer.wait_for(r"login attempt 1 failed: vCenter .* no answer within 2s", timeout=30)
        status, body = health(port)
        assert status == 503 and body.startswith("degraded: not logged in to vCenter ("), body
        proxy.hang(False)
        producer.wait_for(r"vCenter session restored", timeout=60)
        wait_until(lambda: all_enqueued(redis_client, sent), 60, "every event enqueued")
        wait_until(lambda: health(port) == (200, "ok"), 30, "/healthz ok again")
        producer.stop()
    finally:
        proxy.close()
    print(f"\n[hung vCenter] noticed after {noticed:.1f}s (request timeout 2s)")
    assert report("hung vCenter", sent, redis_client) == (0, 0)


# --- helpers

def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _terminate_sessions(admin: VCenter, user: str) -> None:
    """End every session of ``user`` on the server, as an administrator would."""
    manager = admin.content.sessionManager
    keys = [s.key for s in manager.sessionList if s.userName == user]
    assert keys, f"no session of {user!r} to kill"
    manager.TerminateSession(keys)


def _parallel_post(url: str, count: int, label: str, sessions: int = 4) -> list[str]:
    """Post ``count`` events from ``sessions`` sessions at once; their ids in key order."""
    clients = [VCenter(url, user=f"poster{i}") for i in range(sessions)]
    before = clients[0].content.eventManager.latestEvent.key
    threads = [threading.Thread(target=lambda c=c, n=n: [
        c.post(vim.event.GeneralUserEvent(message=f"{label} {n} {i}"))
        for i in range(count // sessions)]) for n, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = clients[0].content.eventManager.latestEvent.key
    uuid = clients[0].instance_uuid
    for client in clients:
        client.close()
    assert after - before == count
    return [event_id(uuid, key) for key in range(before + 1, after + 1)]
