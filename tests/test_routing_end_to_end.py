"""Triggers on event data, pushdown and throttling on real producer processes, the test peer and
Redis: the tasks waiting in each pool's queue are counted by CloudEvent id (no worker runs)."""

from __future__ import annotations

import base64
import json
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from pyVmomi import vim

from producer.cloudevent import event_id
from tests.support import (
    Proc,
    RedisServer,
    Simulator,
    VCenter,
    build_vcsim,
    free_port,
    producer_metric,
    vebaq_argv,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Simulator, VCenter]]:
    sim = Simulator(build_vcsim(), tmp_path, "-host", "5")
    vcenter = VCenter(sim.url)
    yield sim, vcenter
    vcenter.close()
    sim.stop()


class Poster:
    """Posts events and remembers their CloudEvent ids (keys from a one-event collector)."""

    def __init__(self, vcenter: VCenter) -> None:
        self.vcenter = vcenter
        self.probe = vcenter.content.eventManager.CreateCollectorForEvents(
            vim.event.EventFilterSpec())
        self.probe.SetCollectorPageSize(1)

    def post(self, event: vim.event.Event) -> str:
        self.vcenter.post(event)
        return self.last()

    def last(self) -> str:
        """The CloudEvent id of vCenter's newest event."""
        return event_id(self.vcenter.instance_uuid, self.probe.latestPage[0].key)

    def close(self) -> None:
        self.probe.DestroyCollector()


def tasks(r: redis.Redis, pool: str) -> Counter[str]:
    """Tasks waiting in ``pool``'s queue, per CloudEvent id."""
    return Counter(json.loads(raw)["headers"]["id"].rsplit(":", 1)[0]
                   for raw in r.lrange(pool, 0, -1))


def task_events(r: redis.Redis, pool: str) -> dict[str, dict]:
    """The structured CloudEvent of each task waiting in ``pool``'s queue, by id."""
    found = {}
    for raw in r.lrange(pool, 0, -1):
        message = json.loads(raw)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        found[kwargs["event"]["id"]] = kwargs["event"]
    return found


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as answer:
        return json.load(answer)


def producer(env: dict[str, str], log_dir: Path, name: str, port: int) -> Proc:
    proc = Proc(name, vebaq_argv("producer", "--metrics-port", str(port)), env, log_dir)
    proc.wait_for(r"reading vCenter", timeout=60)
    return proc


def config(tmp_path: Path, name: str, triggers: list[dict]) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"functions": ["tests.routing_functions"],
                                    "triggers": triggers}))
    return str(path)


def test_data_triggers_route_exactly_the_matching_events_and_pushdown_reads_fewer(
        peer: tuple[Simulator, VCenter], stack_env: dict[str, str], redis_url: str,
        log_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two producers read the same vCenter into two Redis servers with the same triggers on
    hosts, VMs and users: one pushes its filter down, one reads every event. Both route exactly
    the events each trigger names; the pushed-down one reads fewer."""
    sim, vcenter = peer
    hosts, machines = vcenter.hosts(), vcenter.vms()[:4]
    datacenter = vcenter.content.rootFolder.childEntity[0]
    host0 = hosts[0]
    chosen = [machines[0].name, machines[1].name]
    triggers = [
        {"name": "host0-maintenance", "pool": "hosts", "filters": [
            {"any": [{"exact": {"subject": "EnteredMaintenanceModeEvent"}},
                     {"exact": {"subject": "ExitMaintenanceModeEvent"}}]},
            {"exact": {"data.Host.Name": host0.name}}]},
        {"name": "two-vms-off", "pool": "vms", "filters": [
            {"exact": {"subject": "VmPoweredOffEvent"}},
            {"regex": {"data.Vm.Name": f"^({re.escape(chosen[0])}|{re.escape(chosen[1])})$"}}]},
        {"name": "alice", "pool": "users", "filters": [
            {"exact": {"subject": "GeneralUserEvent", "data.UserName": "alice"}}]},
    ]
    env = {**stack_env, "VCENTER_URL": sim.url, "VEBAQ_CONFIG": config(tmp_path, "data", triggers)}
    second = RedisServer(tmp_path / "redis-local")  # a lease per Redis: both producers read
    request.addfinalizer(second.stop)
    pushed_url, local_url = redis_url, second.url()
    ports = free_port(), free_port()
    pushed = producer({**env, "VEBAQ_BROKER_URL": pushed_url}, log_dir, "pushed", ports[0])
    local = producer({**env, "VEBAQ_BROKER_URL": local_url, "VCENTER_PUSHDOWN": "false"},
                     log_dir, "local", ports[1])
    assert re.search(r"pushdown: vCenter sends only events with eventTypeId in \["
                     r"EnteredMaintenanceModeEvent, ExitMaintenanceModeEvent, GeneralUserEvent, "
                     r"VmPoweredOffEvent\]", pushed.log())
    assert "pushdown: none, reading every event (vcenter.pushdown is false)" in local.log()

    poster = Poster(vcenter)
    expected: dict[str, set[str]] = {"hosts": set(), "vms": set(), "users": set()}
    for i in range(200):  # what nobody asked for
        host = hosts[i % len(hosts)]
        poster.post(vim.event.EventEx(eventTypeId="com.example.Noise", severity="info",
                                      host=vim.event.HostEventArgument(host=host, name=host.name)))
    for host in hosts[:2]:
        for cls in (vim.event.EnteredMaintenanceModeEvent, vim.event.ExitMaintenanceModeEvent):
            ident = poster.post(cls(host=vim.event.HostEventArgument(host=host, name=host.name)))
            if host == host0:
                expected["hosts"].add(ident)
    for vm in machines:
        ident = poster.post(vim.event.VmPoweredOffEvent(
            vm=vim.event.VmEventArgument(vm=vm, name=vm.name),
            host=vim.event.HostEventArgument(host=vm.runtime.host, name=vm.runtime.host.name),
            datacenter=vim.event.DatacenterEventArgument(datacenter=datacenter,
                                                         name=datacenter.name)))
        if vm.name in chosen:
            expected["vms"].add(ident)
    for user in ("bob", "alice"):
        client = VCenter(sim.url, user=user)
        for i in range(3):
            client.post(vim.event.GeneralUserEvent(message=f"{user} {i}"))
            ident = poster.last()  # the simulator stamps the session's user on it
            if user == "alice":
                expected["users"].add(ident)
        client.close()
    poster.close()

    read = {}
    for name, url, port in (("pushed", pushed_url, ports[0]), ("local", local_url, ports[1])):
        r = redis.Redis.from_url(url)
        wait_until(lambda r=r: {p: set(tasks(r, p)) for p in expected} == expected, 60,
                   f"{name}'s tasks")  # alice's last event is the newest: all read before it
        read[name] = producer_metric(port, "vebaq_producer_events_read_total")
        counts = {p: tasks(r, p) for p in expected}
        assert all(c == 1 for pool in counts.values() for c in pool.values()), counts
        print(f"\n[data triggers, {name}] events read={read[name]:.0f} routed="
              f"{ {p: len(c) for p, c in counts.items()} }")
    assert stats(ports[0])["vcenter"]["pushdown"].startswith("eventTypeId in [")
    assert stats(ports[1])["vcenter"]["pushdown"] is None
    print(f"[pushdown] events read: {read['pushed']:.0f} pushed down vs {read['local']:.0f} "
          f"read locally ({read['local'] / max(read['pushed'], 1):.1f}× fewer)")
    assert read["pushed"] == 4 + 4 + 6  # exactly the events of the four subjects
    assert read["local"] >= 200 + read["pushed"]
    for proc in (pushed, local):
        assert proc.stop() == 0
        assert not re.search(r"ERROR|collector stalled", proc.log())


HOSTS = 5
EVENTS = 100


@pytest.mark.parametrize("point", ["anywhere", "after-throttle-decision",
                                   "before-throttle-settle"])
def test_throttles_give_the_expected_task_counts_across_a_kill(
        point: str, peer: tuple[Simulator, VCenter], stack_env: dict[str, str],
        redis_client: redis.Redis, log_dir: Path, tmp_path: Path) -> None:
    """100 alarms for 5 hosts, round robin; the producer is killed (-9) in the middle and
    started again. once_within and once_after (1h): one task per host; batch 10: two tasks per
    host, the 100 events in them once each. Killed ``anywhere`` (by the test, while events
    flow), or at a crash point of the throttle's guarantee (tests/crash_points.py): right after
    a decision that filled a batch, before anything was enqueued; or after the enqueue and the
    checkpoint, before the decisions were settled."""
    sim, vcenter = peer
    hosts = vcenter.hosts()[:HOSTS]
    alarm = {"exact": {"subject": "com.example.HostAlarm"}}
    key = "data.Host.Host.Value"
    triggers = [
        {"name": "alarm-once", "pool": "once", "filters": [alarm],
         "throttle": {"key": key, "once_within": "1h"}},
        {"name": "alarm-after", "pool": "after", "filters": [alarm],
         "throttle": {"key": key, "once_after": "1h"}},
        {"name": "alarm-batch", "pool": "batched", "filters": [alarm],
         "throttle": {"key": key, "batch": 10, "within": "1h"}},
    ]
    env = {**stack_env, "VCENTER_URL": sim.url,
           "VEBAQ_CONFIG": config(tmp_path, "throttle", triggers)}
    if point != "anywhere":
        env.update(VEBAQ_FUNCTIONS="tests.crash_points", VEBAQ_TEST_CRASH=point)
    port = free_port()
    first = producer(env, log_dir, "producer-1", port)
    poster = Poster(vcenter)
    sent: list[str] = []

    def post(count: int) -> None:
        for _ in range(count):
            host = hosts[len(sent) % HOSTS]
            sent.append(poster.post(vim.event.EventEx(
                eventTypeId="com.example.HostAlarm", severity="warning",
                host=vim.event.HostEventArgument(host=host, name=host.name))))

    if point == "anywhere":
        post(40)
        first.wait_for(r"checkpoint at event", timeout=30)
        post(30)
        first.kill()  # -9, wherever it is: deciding, enqueueing, checkpointing
        post(30)
    else:
        post(EVENTS)
        wait_until(lambda: first.popen.poll() is not None, 60, f"the crash {point}")
        assert redis_client.get("vebaq-test:crashed") == point.encode()
        first.kill()
    second = producer(env, log_dir, "producer-2", port)
    wait_until(lambda: len(tasks(redis_client, "batched")) == 2 * HOSTS, 60, "10 batch tasks")

    once, after = tasks(redis_client, "once"), tasks(redis_client, "after")
    batches = task_events(redis_client, "batched")
    in_batches = Counter(e["id"] for b in batches.values() for e in b["data"]["Events"])
    duplicates = sum(c - 1 for pool in ("once", "after", "batched")
                     for c in tasks(redis_client, pool).values() if c > 1)
    print(f"\n[throttle, kill -9 {point}] sent={len(sent)} once={len(once)} after={len(after)} "
          f"batches={len(batches)} events in batches={len(in_batches)} "
          f"lost={len(set(sent) - set(in_batches))} "
          f"doubled-in-batches={sum(c - 1 for c in in_batches.values())} "
          f"duplicate-tasks={duplicates}")
    assert set(once) == set(after) == set(sent[:HOSTS])  # the first alarm of each host
    assert set(in_batches) == set(sent) and set(in_batches.values()) == {1}
    for batch in batches.values():
        assert batch["type"] == "vebaq.batch.v1" and batch["data"]["Count"] == 10
        assert len({e["data"]["Host"]["Host"]["Value"] for e in batch["data"]["Events"]}) == 1
    if point == "anywhere":  # the second producer read 30 alarms at least: counted and said
        throttled = stats(port)["throttled"]
        assert throttled["alarm-batch"]["batched"] > 0
        assert throttled["alarm-once"]["suppressed"] > 0
        assert "throttle: trigger 'alarm-once' (once_within 3600s per data.Host.Host.Value) " \
               "suppressed" in second.log()
    poster.close()
    assert second.stop() == 0
