"""The maintenance mirror end to end: simulator hosts change maintenance mode with real tasks,
the producer enqueues the events, four vrops workers mirror them into the fake vROps while it
fails 20% of calls; every host must end in vCenter's latest state. And a vCenter that numbers its
events anew (a restarted simulator, as a vCenter restored from a backup): its lower-numbered
events of the new key epoch still reach vROps."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pyVmomi import vim

from tests.support import (
    Simulator,
    VCenter,
    build_vcsim,
    free_port,
    start_producer,
    start_worker,
    wait_until,
)
from vebaq.core import deadletters, retrystore
from vebaq.devtools.fake_vrops import DEFAULT_PASSWORD, DEFAULT_USERNAME, FakeVrops
from workers.functions.vrops import applied

pytestmark = pytest.mark.slow

HOSTS = 50


@pytest.fixture(scope="module")
def big_vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = Simulator(build_vcsim(), tmp_path_factory.mktemp("big"), "-host", str(HOSTS))
    yield sim
    sim.stop()


@pytest.fixture
def vrops_env(stack_env: dict[str, str], big_vcsim: Simulator, tmp_path: Path,
              ) -> Iterator[tuple[dict[str, str], FakeVrops, VCenter]]:
    vc = VCenter(big_vcsim.url)
    hosts = vc.hosts()
    fake = FakeVrops([(h.name, h._moId, vc.instance_uuid) for h in hosts], seed=7).start()
    config = tmp_path / "vebaq.yaml"
    config.write_text("pools:\n  vrops: {retry: 12, backoffDelay: 200ms, maxDelay: 2s}\n")
    env = {**stack_env, "VCENTER_URL": big_vcsim.url, "VEBAQ_CONFIG": str(config),
           "VROPS_URL": fake.url, "VROPS_USER": DEFAULT_USERNAME,
           "VROPS_PASSWORD": DEFAULT_PASSWORD, "VROPS_INSECURE_SSL": "false"}
    yield env, fake, vc
    fake.stop()
    vc.close()


def vcenter_state(vc: VCenter) -> dict[str, str]:
    return {h._moId: "MAINTAINED_MANUAL" if h.runtime.inMaintenanceMode else "STARTED"
            for h in vc.hosts()}


def test_one_host_enters_and_exits(vrops_env: tuple, log_dir: Path) -> None:
    env, fake, vc = vrops_env
    worker = start_worker("vrops", env, log_dir)
    producer = start_producer(env, log_dir)
    host = vc.hosts()[0]
    vc.maintenance(host, enter=True)
    wait_until(lambda: fake.host_state(host._moId, vc.instance_uuid) == "MAINTAINED_MANUAL", 30,
               "the host to be maintained in vROps")
    vc.maintenance(host, enter=False)
    wait_until(lambda: fake.host_state(host._moId, vc.instance_uuid) == "STARTED", 30,
               "the host to be started in vROps")
    producer.stop()
    worker.stop()
    assert DEFAULT_PASSWORD not in worker.log()


def test_fifty_hosts_four_workers_twenty_percent_failures_converge(
        vrops_env: tuple, log_dir: Path, redis_client: redis.Redis) -> None:
    env, fake, vc = vrops_env
    workers = [start_worker("vrops", env, log_dir, name=f"vrops-{i}") for i in range(4)]
    producer = start_producer(env, log_dir)
    fake.reset_calls()
    fake.configure(fail_rate=0.2)

    rng = random.Random(2026)
    hosts = vc.hosts()
    changes = 0
    for host in hosts:
        for _ in range(rng.randint(1, 4)):  # enter, exit, enter, … ends in either state
            vc.maintenance(host, enter=not host.runtime.inMaintenanceMode)
            changes += 1
    expected = vcenter_state(vc)

    def converged() -> bool:
        actual = {moref: fake.host_state(moref, vc.instance_uuid) for moref in expected}
        return actual == expected and retrystore.pending(redis_client) == 0 \
            and redis_client.llen("vrops") == 0

    wait_until(converged, 180, "every host to reach vCenter's latest state in vROps", 0.5)
    calls = fake.total_calls()
    injected = sum(fake.injected.values())
    print(f"\n[vrops e2e] {len(hosts)} hosts, {changes} maintenance events, 4 workers, 20% 5xx: "
          f"{calls} vROps calls ({injected} failed by injection) = {calls / changes:.2f} per "
          f"event; dead letters: {deadletters.depth(redis_client)}")
    assert deadletters.depth(redis_client) == 0
    assert injected > 0, "the fake should have failed some calls"
    producer.stop()
    consumed = [w for w in workers if "Task EnteredMaintenanceModeEvent" in w.log()
                or "Task ExitMaintenanceModeEvent" in w.log()]
    for worker in workers:
        worker.stop()
    assert len(consumed) >= 2, "the work should be spread over several workers"


def test_a_renumbered_vcenter_s_exit_reaches_vrops(
        stack_env: dict[str, str], log_dir: Path, redis_client: redis.Redis,
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The host enters maintenance at a high key; the simulator restarts on the same port with
    its history reset (keys start again, the producer starts key epoch 1); the host enters and
    exits maintenance at keys below the first Enter's. vROps must show it out of maintenance
    (before the fix both were skipped as stale and it stayed maintained)."""
    port = free_port()
    binary = build_vcsim()
    sim = Simulator(binary, tmp_path_factory.mktemp("first"), "-l", f"127.0.0.1:{port}")
    vc = VCenter(sim.url)
    host = vc.hosts()[0]
    moref, uuid = host._moId, vc.instance_uuid
    fake = FakeVrops([(h.name, h._moId, uuid) for h in vc.hosts()], seed=7).start()
    config = tmp_path / "vebaq.yaml"
    config.write_text("pools:\n  vrops: {retry: 12, backoffDelay: 200ms, maxDelay: 2s}\n")
    env = {**stack_env, "VCENTER_URL": sim.url, "VEBAQ_CONFIG": str(config),
           "VROPS_URL": fake.url, "VROPS_USER": DEFAULT_USERNAME,
           "VROPS_PASSWORD": DEFAULT_PASSWORD, "VROPS_INSECURE_SSL": "false"}
    worker = start_worker("vrops", env, log_dir)
    producer = start_producer(env, log_dir)
    try:
        for i in range(60):  # the Enter gets a key the new numbering will not reach
            vc.post(vim.event.GeneralUserEvent(message=f"before the restore {i}"))
        vc.maintenance(host, enter=True)
        entered_key = vc.content.eventManager.latestEvent.key
        wait_until(lambda: fake.host_state(moref, uuid) == "MAINTAINED_MANUAL", 30,
                   "the host to be maintained in vROps")
        wait_until(lambda: checkpoint(redis_client) >= entered_key, 30, "the checkpoint")
        assert applied(redis_client, uuid, moref)["key"] == str(entered_key)
        vc.close()

        sim.stop()  # "restored from a backup": same instance, history and numbering reset
        sim = Simulator(binary, tmp_path_factory.mktemp("restored"), "-l", f"127.0.0.1:{port}")
        producer.wait_for(r"vCenter session restored", timeout=90)
        vc = VCenter(sim.url)
        host = next(h for h in vc.hosts() if h._moId == moref)
        assert vc.instance_uuid == uuid
        vc.maintenance(host, enter=True)
        vc.maintenance(host, enter=False)
        exited_key = vc.content.eventManager.latestEvent.key
        assert exited_key < entered_key, (exited_key, entered_key)
        assert "forgetting keys" in producer.log()

        wait_until(lambda: applied(redis_client, uuid, moref).get("key") == str(exited_key), 60,
                   "the Exit of the new epoch to be applied")
        assert fake.host_state(moref, uuid) == "STARTED"
        record = applied(redis_client, uuid, moref)
        assert (record["key_epoch"], record["subject"]) == ("1", "ExitMaintenanceModeEvent")
        assert f"ExitMaintenanceModeEvent {exited_key} (key epoch 1)" in worker.log()
        assert "stale, skipped" not in worker.log()
        assert [c.method for c in fake.history][-1] == "DELETE"
        assert deadletters.depth(redis_client) == 0
        vc.close()
    finally:
        producer.stop()
        worker.stop()
        fake.stop()
        sim.stop()


def checkpoint(r: redis.Redis) -> int:
    found = r.keys("vebaq:checkpoint:*")
    return json.loads(r.get(found[0]))["key"] if found else -1
