"""The simulator as a vCenter peer for event reading (tests/vcsim/*.go): paging forward, the
filter, current govmomi's stale collectors and 32-collector limit, TerminateSession, prompt
property updates, no deadlocks; and -legacy-events keeping Debian 0.24's behaviour.

Tests that change the simulator's global state (collector counts, staleness, retention) start
a simulator of their own; the rest use the session's ``vcsim``."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pyVmomi import vim, vmodl

from tests.support import Simulator, VCenter, build_vcsim

Spec = vim.event.EventFilterSpec


def user_events(vcenter: VCenter, count: int, label: str) -> None:
    for i in range(count):
        vcenter.post(vim.event.GeneralUserEvent(message=f"{label} {i}"))


def messages(events: list | None) -> list[str]:
    return [e.message for e in events or () if isinstance(e, vim.event.GeneralUserEvent)]


def hooks(url: str) -> dict:
    parts = urlsplit(url)
    with urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/vebaq/collectors") as r:
        return json.load(r)


def collector_since(vcenter: VCenter, **spec: object) -> vim.event.EventHistoryCollector:
    """A collector on the root folder (recursion all) for events from now on."""
    spec.setdefault("time", Spec.ByTime(beginTime=vcenter.si.CurrentTime()))
    root = Spec.ByEntity(entity=vcenter.content.rootFolder, recursion="all")
    return vcenter.content.eventManager.CreateCollectorForEvents(Spec(entity=root, **spec))


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Starts a simulator of the test's own with the given flags; returns its URL."""
    started: list[Simulator] = []

    def start(*args: str) -> str:
        sim = Simulator(build_vcsim(), tmp_path, *args)
        started.append(sim)
        return sim.url

    yield start
    for sim in started:
        sim.stop()


def test_new_events_are_paged_forward_once_in_key_order(vcenter: VCenter) -> None:
    collector = collector_since(vcenter)
    assert collector.ReadNextEvents(100) == []
    user_events(vcenter, 25, "a")
    first = collector.ReadNextEvents(10)
    rest = collector.ReadNextEvents(100)
    assert messages(first + rest) == [f"a {i}" for i in range(25)]
    keys = [e.key for e in first + rest]
    assert keys == list(range(keys[0], keys[0] + 25))  # increasing by one
    assert collector.ReadNextEvents(100) == []
    user_events(vcenter, 3, "b")
    assert messages(collector.ReadNextEvents(100)) == ["b 0", "b 1", "b 2"]
    # latestPage: the newest page-size (10) events, newest first; latestEvent the newest.
    assert [e.key for e in collector.latestPage] == list(range(keys[-1] + 3, keys[-1] - 7, -1))
    assert vcenter.content.eventManager.latestEvent.key == keys[-1] + 3
    collector.DestroyCollector()


def test_the_startup_history_is_there(simulator: Callable[..., str]) -> None:
    vcenter = VCenter(simulator())
    root = Spec.ByEntity(entity=vcenter.content.rootFolder, recursion="all")
    collector = vcenter.content.eventManager.CreateCollectorForEvents(Spec(entity=root))
    history = collector.ReadNextEvents(1000)
    assert len(history) >= 26  # the model's ~25 and our login
    assert [e.key for e in history] == list(range(1, len(history) + 1))
    vcenter.close()


def test_time_filter(vcenter: VCenter) -> None:
    user_events(vcenter, 3, "before")
    begin = vcenter.si.CurrentTime()
    user_events(vcenter, 4, "inside")
    end = vcenter.si.CurrentTime()
    user_events(vcenter, 2, "after")
    window = Spec.ByTime(beginTime=begin, endTime=end)
    collector = collector_since(vcenter, time=window)
    assert messages(collector.ReadNextEvents(100)) == [f"inside {i}" for i in range(4)]
    user_events(vcenter, 2, "later")  # after endTime: never in this collector
    assert collector.ReadNextEvents(100) == []
    collector.DestroyCollector()
    found = vcenter.content.eventManager.QueryEvents(Spec(time=window))
    assert messages(found) == [f"inside {i}" for i in reversed(range(4))]  # newest first


def test_entity_type_category_and_user_filters(vcenter: VCenter) -> None:
    host = vcenter.hosts()[0]
    other = vcenter.hosts()[1]
    datacenter = vcenter.content.rootFolder.childEntity[0]
    begin = vcenter.si.CurrentTime()
    dc_arg = vim.event.DatacenterEventArgument(datacenter=datacenter, name=datacenter.name)
    for h in (host, other):
        vcenter.post(vim.event.EnteredMaintenanceModeEvent(
            host=vim.event.HostEventArgument(host=h, name=h.name), datacenter=dc_arg))
    vcenter.post(vim.event.GeneralUserEvent(message="no entity"))
    vcenter.post(vim.event.EventEx(eventTypeId="com.example.Thing", severity="warning",
                                   message="ex"))
    em = vcenter.content.eventManager
    since = Spec.ByTime(beginTime=begin)

    def keys(**spec: object) -> list[str]:
        c = em.CreateCollectorForEvents(Spec(time=since, **spec))
        try:
            return [type(e).__name__ + (":" + e.host.name if e.host else "")
                    for e in c.ReadNextEvents(100)]
        finally:
            c.DestroyCollector()

    everything = keys(entity=Spec.ByEntity(entity=vcenter.content.rootFolder, recursion="all"))
    assert len(everything) == 4
    assert keys(entity=Spec.ByEntity(entity=host, recursion="self")) == [
        f"vim.event.EnteredMaintenanceModeEvent:{host.name}"]
    assert len(keys(entity=Spec.ByEntity(entity=datacenter, recursion="children"))) == 2
    assert keys(eventTypeId=["com.example.Thing"]) == ["vim.event.EventEx"]
    assert len(keys(eventTypeId=["EnteredMaintenanceModeEvent"])) == 2
    assert keys(category=["warning"]) == ["vim.event.EventEx"]
    assert len(keys(userName=Spec.ByUsername(systemUser=False, userList=["tester"]))) == 4
    assert keys(userName=Spec.ByUsername(systemUser=False, userList=["nobody"])) == []


def test_rewind_reset_previous_and_argument_checks(vcenter: VCenter) -> None:
    collector = collector_since(vcenter, maxCount=3)
    user_events(vcenter, 6, "e")
    assert messages(collector.ReadNextEvents(4)) == ["e 0", "e 1", "e 2", "e 3"]
    assert messages(collector.ReadPreviousEvents(2)) == ["e 3", "e 2"]  # backward, newest first
    collector.RewindCollector()
    assert messages(collector.ReadNextEvents(1)) == ["e 0"]  # the oldest again
    collector.ResetCollector()  # just before the latest page (e 3..e 5)
    assert messages(collector.ReadPreviousEvents(10)) == ["e 2", "e 1", "e 0"]
    for bad in (0, -1):
        with pytest.raises(vmodl.fault.InvalidArgument):
            collector.ReadNextEvents(bad)
        with pytest.raises(vmodl.fault.InvalidArgument):
            collector.ReadPreviousEvents(bad)
    for bad in (-1, 1001):
        with pytest.raises(vmodl.fault.InvalidArgument):
            collector.SetCollectorPageSize(bad)
    collector.SetCollectorPageSize(0)
    assert list(collector.latestPage or ()) == []
    collector.SetCollectorPageSize(1000)
    assert messages(collector.latestPage) == [f"e {i}" for i in reversed(range(6))]
    collector.DestroyCollector()


def test_a_collector_too_far_behind_goes_stale_silently(simulator: Callable[..., str]) -> None:
    url = simulator("-collector-capacity", "50")
    vcenter = VCenter(url)
    collector = collector_since(vcenter)
    user_events(vcenter, 50, "full")  # exactly the capacity unread: fine
    assert len(collector.ReadNextEvents(1000)) == 50
    user_events(vcenter, 51, "over")  # one more than it can hold unread
    assert hooks(url)["stale"] == 1
    assert collector.ReadNextEvents(1000) == []
    user_events(vcenter, 2, "after")
    assert collector.ReadNextEvents(1000) == []  # for good, and no fault
    collector.RewindCollector()
    assert collector.ReadNextEvents(1000) == []
    assert messages(collector.latestPage)[:2] == ["after 1", "after 0"]  # still updates
    fresh = collector_since(vcenter)
    user_events(vcenter, 1, "new")
    assert messages(fresh.ReadNextEvents(10)) == ["new 0"]
    assert hooks(url) | {"events": 0} == {"live": 1, "stale": 1, "limit": 32, "capacity": 50,
                                          "retention": 100000, "events": 0, "legacy": False}
    vcenter.close()


def test_read_events_make_room(simulator: Callable[..., str]) -> None:
    url = simulator("-collector-capacity", "20")
    vcenter = VCenter(url)
    collector = collector_since(vcenter)
    for round_ in range(5):  # 75 events through a 20-event collector, read as they come
        user_events(vcenter, 15, f"r{round_}")
        assert len(collector.ReadNextEvents(100)) == 15
    assert hooks(url)["stale"] == 0
    collector.RewindCollector()  # it holds the newest 20
    assert messages(collector.ReadNextEvents(100)) == (
        [f"r3 {i}" for i in range(10, 15)] + [f"r4 {i}" for i in range(15)])
    vcenter.close()


def test_thirty_two_collectors_in_all(simulator: Callable[..., str]) -> None:
    url = simulator()
    first, second = VCenter(url), VCenter(url)
    made = [collector_since(first) for _ in range(20)]
    made += [collector_since(second) for _ in range(12)]
    with pytest.raises(vim.fault.InvalidState) as raised:
        collector_since(first)
    assert raised.value.msg == "Too many event collectors to create"
    made.pop().DestroyCollector()  # only DestroyCollector frees one
    made.append(collector_since(first))
    second.close()  # logging out keeps its 12 counted
    with pytest.raises(vim.fault.InvalidState):
        collector_since(first)
    assert hooks(url)["live"] == 32
    first.close()


def test_terminate_session(simulator: Callable[..., str]) -> None:
    url = simulator()
    victim, admin = VCenter(url), VCenter(url)
    collector = collector_since(victim)
    key = victim.content.sessionManager.currentSession.key
    with pytest.raises(vmodl.fault.InvalidArgument):  # not one's own session
        victim.content.sessionManager.TerminateSession([key])
    pc, version = latest_page_waiter(victim, collector)
    waited: dict = {}

    def wait() -> None:
        started = time.monotonic()
        try:
            pc.WaitForUpdatesEx(version, vmodl.query.PropertyCollector.WaitOptions(
                maxWaitSeconds=10))
        except vim.fault.NotAuthenticated as exc:
            waited["fault"] = exc
        waited["took"] = time.monotonic() - started

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    admin.content.sessionManager.TerminateSession([key])
    waiter.join(15)
    assert "fault" in waited and waited["took"] < 2.5  # a wait under way ends too
    with pytest.raises(vim.fault.NotAuthenticated):
        collector.ReadNextEvents(10)
    with pytest.raises(vim.fault.NotAuthenticated):
        victim.content.eventManager.PostEvent(vim.event.GeneralUserEvent(
            key=0, chainId=0, createdTime=datetime.now(UTC), userName="x", message="x"))
    with pytest.raises(vim.fault.NotAuthenticated):
        _ = victim.content.eventManager.latestEvent
    with pytest.raises(vim.fault.NotFound):
        admin.content.sessionManager.TerminateSession([key])
    admin.close()


def latest_page_waiter(vcenter: VCenter, collector: vim.event.EventHistoryCollector):
    pc = vcenter.content.propertyCollector.CreatePropertyCollector()
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=collector)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(
            type=vim.event.EventHistoryCollector, pathSet=["latestPage"])])
    pc.CreateFilter(spec, partialUpdates=False)
    initial = pc.WaitForUpdatesEx("", vmodl.query.PropertyCollector.WaitOptions())
    return pc, initial.version


def test_wait_for_updates_on_latest_page_is_prompt(vcenter: VCenter, vcsim: str) -> None:
    waiter = VCenter(vcsim)
    collector = collector_since(waiter)
    pc, version = latest_page_waiter(waiter, collector)
    latencies = []
    for i in range(10):
        result: dict = {}

        def wait(version: str = version, result: dict = result) -> None:
            result["set"] = pc.WaitForUpdatesEx(
                version, vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=10))
            result["at"] = time.perf_counter()

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.1)  # the waiter is waiting
        posted = time.perf_counter()
        vcenter.post(vim.event.GeneralUserEvent(message=f"w {i}"))
        thread.join(10)
        update = result["set"]
        latencies.append(result["at"] - posted)
        change = update.filterSet[0].objectSet[0].changeSet[0]
        assert change.name == "latestPage" and change.val[0].message == f"w {i}"
        version = update.version
    print(f"\nWaitForUpdatesEx wake-up after PostEvent (incl. its round trip): "
          f"median {sorted(latencies)[5] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < 0.05
    # Nothing happens: None after maxWaitSeconds.
    started = time.perf_counter()
    assert pc.WaitForUpdatesEx(version, vmodl.query.PropertyCollector.WaitOptions(
        maxWaitSeconds=1)) is None
    assert 0.95 < time.perf_counter() - started < 1.5
    assert pc.CheckForUpdates(version) is None
    # latestEvent follows too.
    em_pc = waiter.content.propertyCollector.CreatePropertyCollector()
    em_pc.CreateFilter(vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=waiter.content.eventManager)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(
            type=vim.event.EventManager, pathSet=["latestEvent"])]), partialUpdates=False)
    v0 = em_pc.WaitForUpdatesEx("", vmodl.query.PropertyCollector.WaitOptions()).version
    vcenter.post(vim.event.GeneralUserEvent(message="latest"))
    update = em_pc.WaitForUpdatesEx(v0, vmodl.query.PropertyCollector.WaitOptions(
        maxWaitSeconds=5))
    assert update.filterSet[0].objectSet[0].changeSet[0].val.message == "latest"
    # The deprecated WaitForUpdates, CancelWaitForUpdates, and a destroyed collector leaving.
    vcenter.post(vim.event.GeneralUserEvent(message="old style"))
    update = pc.WaitForUpdates(version)
    assert update.filterSet[0].objectSet[0].changeSet[0].val[0].message == "old style"
    version = update.version
    canceller = threading.Timer(0.3, pc.CancelWaitForUpdates)
    canceller.start()
    with pytest.raises(vmodl.fault.RequestCanceled):
        pc.WaitForUpdatesEx(version, vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=5))
    collector.DestroyCollector()
    update = pc.WaitForUpdatesEx(version, vmodl.query.PropertyCollector.WaitOptions(
        maxWaitSeconds=5))
    assert update.filterSet[0].objectSet[0].kind == "leave"
    waiter.close()


def test_no_deadlock_posting_reading_destroying_waiting(simulator: Callable[..., str]) -> None:
    url = simulator()
    stop = time.monotonic() + 20
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, body: Callable[[VCenter], None]) -> None:
        vcenter = VCenter(url)
        try:
            n = 0
            while time.monotonic() < stop:
                body(vcenter)
                n += 1
            counts[name] = n
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            vcenter.close()

    def post(vc: VCenter) -> None:
        user_events(vc, 5, "p")

    def read(vc: VCenter) -> None:
        c = collector_since(vc, time=Spec.ByTime(beginTime=vc.si.CurrentTime() - timedelta(1)))
        for _ in range(5):
            c.ReadNextEvents(200)
        c.DestroyCollector()

    def create_destroy(vc: VCenter) -> None:
        c = collector_since(vc)
        _ = c.latestPage
        c.DestroyCollector()

    def wait(vc: VCenter) -> None:
        c = collector_since(vc)
        pc, version = latest_page_waiter(vc, c)
        for _ in range(5):
            update = pc.WaitForUpdatesEx(version, vmodl.query.PropertyCollector.WaitOptions(
                maxWaitSeconds=1))
            version = update.version if update else version
        pc.DestroyPropertyCollector()
        c.DestroyCollector()

    threads = [threading.Thread(target=run, args=(f.__name__, f))
               for f in (post, read, create_destroy, wait)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: deadlock?"
    assert not errors, errors
    print(f"\n20 s, 4 threads, rounds: {counts}")
    assert all(counts.get(n, 0) > 3 for n in ("post", "read", "create_destroy", "wait")), counts
    assert hooks(url)["live"] == 0


def test_retention(simulator: Callable[..., str]) -> None:
    vcenter = VCenter(simulator("-event-retention", "40"))
    user_events(vcenter, 30, "r")
    root = Spec.ByEntity(entity=vcenter.content.rootFolder, recursion="all")
    collector = vcenter.content.eventManager.CreateCollectorForEvents(Spec(entity=root))
    kept = collector.ReadNextEvents(1000)
    assert len(kept) == 40 and messages(kept)[-30:] == [f"r {i}" for i in range(30)]
    vcenter.close()


def test_legacy_events_keep_debians_behaviour(simulator: Callable[..., str]) -> None:
    url = simulator("-legacy-events")
    assert hooks(url) == {"live": 0, "stale": 0, "limit": 0, "capacity": 0, "retention": 0,
                          "events": 0, "legacy": True}
    vcenter = VCenter(url)
    collector = collector_since(vcenter)
    collector.ReadNextEvents(1000)
    user_events(vcenter, 3, "legacy")
    assert collector.ReadNextEvents(1000) == []  # Debian 0.24 does not page forward
    assert messages(collector.latestPage)[:3] == ["legacy 2", "legacy 1", "legacy 0"]
    vcenter.close()
