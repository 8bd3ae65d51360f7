"""The event reader: on the simulator (latestPage path) and with real-vCenter paging semantics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from pyVmomi import vim

from producer.reader import MAX_EVENTS_PER_POLL, EventReader, SeenKeys
from tests.support import VCenter


def post_many(vcenter: VCenter, count: int, label: str) -> None:
    for i in range(count):
        vcenter.post(vim.event.GeneralUserEvent(message=f"{label} {i}"))


def messages(events: list) -> list[str]:
    return [e.message for e in events if isinstance(e, vim.event.GeneralUserEvent)]


def test_simulator_new_events_once_in_key_order(vcenter: VCenter) -> None:
    reader = EventReader(vcenter.content, begin=vcenter.si.CurrentTime(), seen=SeenKeys(),
                         latest_page_fallback=True)
    reader.open()
    assert reader.poll() == []  # history before `begin` is never returned
    post_many(vcenter, 7, "first")
    events = reader.poll()
    assert messages(events) == [f"first {i}" for i in range(7)]
    keys = [e.key for e in events]
    assert keys == sorted(keys)
    # Read but not confirmed: a re-poll returns them again (nothing is lost before the enqueue).
    assert [e.key for e in reader.poll()] == keys
    reader.confirmed(keys, begin=events[-1].createdTime)
    assert reader.poll() == []
    post_many(vcenter, 3, "second")
    assert messages(reader.poll()) == [f"second {i}" for i in range(3)]
    reader.close()


def test_simulator_a_burst_between_polls(vcenter: VCenter) -> None:
    """The simulator's latestPage does not always show every new event: the reader notices
    missing keys and reads the window again."""
    reader = EventReader(vcenter.content, begin=vcenter.si.CurrentTime(), seen=SeenKeys(),
                         latest_page_fallback=True)
    reader.open()
    post_many(vcenter, 2, "warm-up")
    warm = reader.poll()
    reader.confirmed([e.key for e in warm], begin=warm[0].createdTime)
    post_many(vcenter, 300, "burst")
    burst = messages(reader.poll())
    assert burst == [f"burst {i}" for i in range(300)]
    reader.close()


class ForwardCollector:
    """An EventHistoryCollector with a real vCenter's semantics, which no simulator here has:
    ``ReadNextEvents`` pages forward in key order from where the last call stopped, and
    ``latestPage`` holds the newest ``page_size`` events."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.position = 0
        self.page_size = 10
        self.calls = 0

    def SetCollectorPageSize(self, size: int) -> None:  # noqa: N802 - vSphere's name
        self.page_size = size

    def ReadNextEvents(self, max_count: int) -> list:  # noqa: N802
        self.calls += 1
        page = self.log[self.position:self.position + max_count]
        self.position += len(page)
        return page

    @property
    def latestPage(self) -> list:  # noqa: N802
        return list(reversed(self.log[-self.page_size:]))

    def DestroyCollector(self) -> None:  # noqa: N802
        pass


def test_forward_paging_of_a_real_vcenter_reads_every_event_once() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    log: list = []
    collector = ForwardCollector(log)
    content = SimpleNamespace(eventManager=SimpleNamespace(
        CreateCollectorForEvents=lambda spec: collector), rootFolder=vim.Folder("group-d1"))
    reader = EventReader(content, begin=start, seen=SeenKeys())
    reader.open()

    def add(n: int) -> None:
        for _ in range(n):
            key = len(log) + 1
            log.append(vim.event.GeneralUserEvent(key=key, chainId=key, message=str(key),
                                                  createdTime=start + timedelta(seconds=key)))

    add(2500)  # a backlog: drained with vCenter's largest page
    first = reader.poll()
    assert [e.key for e in first] == list(range(1, 2501))
    assert collector.calls == 3  # 1000 + 1000 + 500, and no latestPage read by default
    reader.confirmed([e.key for e in first], begin=first[-1].createdTime)
    add(3)
    assert [e.key for e in reader.poll()] == [2501, 2502, 2503]


def test_a_huge_backlog_streams_in_bounded_polls() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    log = [vim.event.GeneralUserEvent(key=k, chainId=k, createdTime=start + timedelta(seconds=k))
           for k in range(1, 12_001)]
    collector = ForwardCollector(log)
    content = SimpleNamespace(eventManager=SimpleNamespace(
        CreateCollectorForEvents=lambda spec: collector), rootFolder=vim.Folder("group-d1"))
    reader = EventReader(content, begin=start, seen=SeenKeys())
    sizes = []
    while batch := reader.poll():
        sizes.append(len(batch))
        reader.confirmed([e.key for e in batch], begin=batch[-1].createdTime)
    assert sizes == [MAX_EVENTS_PER_POLL, MAX_EVENTS_PER_POLL, 2000]
