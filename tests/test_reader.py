"""The event reader against the test peer (``tests/vcsim``), which pages like a vCenter.

Each test says what it models: forward paging (the vSphere API's ``ReadNextEvents``), a
collector that goes stale silently (current govmomi past its capacity; VEBA's "100 events, then
nothing"), vCenter's event retention running out, a lost session, and an old simulator that
does not page forward at all (Debian's govmomi 0.24, ``-legacy-events``).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyVmomi import vim

from producer.reader import MAX_EVENTS_PER_POLL, STALL_POLLS, EventReader, SeenKeys
from tests.support import Simulator, VCenter, build_vcsim, drain


def post_many(vcenter: VCenter, count: int, label: str) -> None:
    for i in range(count):
        vcenter.post(vim.event.GeneralUserEvent(message=f"{label} {i}"))


def messages(events: list) -> list[str]:
    return [e.message for e in events if isinstance(e, vim.event.GeneralUserEvent)]


def collectors(sdk_url: str) -> dict:
    """The peer's collector count (a test hook outside the SOAP API)."""
    with urllib.request.urlopen(sdk_url.removesuffix("/sdk") + "/vebaq/collectors",
                                timeout=10) as answer:
        return json.load(answer)


@pytest.fixture
def peer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, VCenter]]:
    """A simulator of its own, started with the test's ``peer_args`` marker's flags."""
    marker = request.node.get_closest_marker("peer_args")
    sim = Simulator(build_vcsim(), tmp_path, *(marker.args if marker else ()))
    vcenter = VCenter(sim.url)
    yield sim.url, vcenter
    vcenter.close()
    sim.stop()


def new_reader(vcenter: VCenter) -> EventReader:
    reader = EventReader(vcenter.content, begin=vcenter.si.CurrentTime(), seen=SeenKeys())
    reader.open()
    return reader


def test_new_events_once_in_key_order(vcenter: VCenter) -> None:
    """vCenter's forward paging: every event posted after the collector came is read once."""
    reader = new_reader(vcenter)
    for _ in range(STALL_POLLS + 1):  # history before `begin` is never returned, nor is it a
        assert reader.poll() == []   # stall: those events are not the reader's
    assert reader.resets == 0 and reader.stall is None
    post_many(vcenter, 7, "first")
    events = reader.poll()
    assert messages(events) == [f"first {i}" for i in range(7)]
    keys = [e.key for e in events]
    assert keys == sorted(keys)
    reader.confirmed(keys, begin=events[-1].createdTime)
    assert reader.poll() == []
    post_many(vcenter, 3, "second")
    assert messages(reader.poll()) == [f"second {i}" for i in range(3)]
    assert reader.resets == 0 and reader.stall is None
    reader.close()


@pytest.mark.peer_args("-collector-capacity", "50")
def test_a_collector_that_went_stale_is_replaced_and_nothing_is_lost(
        peer: tuple[str, VCenter], caplog: pytest.LogCaptureFixture) -> None:
    """Current govmomi: a collector more than its capacity behind returns nothing, ever, and
    says nothing. A burst of 10× the capacity between two polls."""
    url, vcenter = peer
    reader = new_reader(vcenter)
    post_many(vcenter, 1, "warm-up")
    drain(reader, polls=1)
    post_many(vcenter, 500, "burst")
    with caplog.at_level(logging.INFO, logger="vebaq.producer"):
        read = drain(reader, polls=STALL_POLLS + 2)
    got = messages(read)
    print(f"\n[stale collector] sent=500 read={len(set(got))} duplicates={len(got) - len(set(got))}"
          f" lost={500 - len(set(got))} resets={reader.resets}")
    assert got == [f"burst {i}" for i in range(500)]
    assert reader.resets >= 1 and reader.stall is None and reader.skipped == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("collector stalled: vCenter's newest")
    assert collectors(url)["live"] == 1  # the stale one was destroyed
    reader.close()
    assert collectors(url)["live"] == 0


@pytest.mark.peer_args("-collector-capacity", "50", "-event-retention", "120")
def test_events_vcenter_no_longer_holds_are_reported_not_silent(
        peer: tuple[str, VCenter], caplog: pytest.LogCaptureFixture) -> None:
    """A vCenter whose event retention ran out before the reader got to the events."""
    _, vcenter = peer
    reader = new_reader(vcenter)
    post_many(vcenter, 1, "warm-up")
    drain(reader, polls=1)
    post_many(vcenter, 300, "burst")  # the peer keeps only the newest 120
    with caplog.at_level(logging.ERROR, logger="vebaq.producer"):
        got = messages(drain(reader, polls=STALL_POLLS + 2))
    assert got == [f"burst {i}" for i in range(180, 300)]
    assert reader.skipped == 180
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "vCenter no longer holds events" in error and "180 event(s) skipped" in error


def test_one_collector_per_reader_destroyed_on_replacement_and_close(
        peer: tuple[str, VCenter]) -> None:
    """Current govmomi counts every collector not destroyed against its limit of 32."""
    url, vcenter = peer
    reader = new_reader(vcenter)
    for _ in range(40):  # more than the limit: each open replaces (destroys) the last one
        reader.open()
        assert collectors(url)["live"] == 1
    reader.close()
    assert collectors(url)["live"] == 0


def test_a_new_session_reads_on_where_the_old_one_stopped(peer: tuple[str, VCenter]) -> None:
    """A session the server ended (TerminateSession): its calls fail with NotAuthenticated; a
    reader reattached to a new session reads on, nothing missed, nothing twice."""
    url, admin = peer
    producer = VCenter(url, user="vebaq-reader")
    reader = new_reader(producer)
    post_many(admin, 2, "before")
    drain(reader, polls=1)
    admin.content.sessionManager.TerminateSession([producer.content.sessionManager
                                                   .currentSession.key])
    post_many(admin, 2, "between")
    with pytest.raises(vim.fault.NotAuthenticated):
        reader.poll()
    reader.close()  # through the dead session: fails quietly
    again = VCenter(url, user="vebaq-reader")
    reader.reattach(again.content)
    post_many(admin, 2, "after")
    assert messages(drain(reader, polls=1)) == ["between 0", "between 1", "after 0", "after 1"]
    reader.close()


@pytest.mark.peer_args("-legacy-events")
def test_an_old_simulator_that_does_not_page_forward_still_delivers_everything(
        peer: tuple[str, VCenter]) -> None:
    """Debian's govmomi 0.24 (the vmware/vcsim stand-in): collectors never page new events
    forward and latestEvent is never set; the watchdog's resets deliver them, late."""
    _, vcenter = peer
    reader = new_reader(vcenter)
    sent = []
    for round_ in range(3):
        post_many(vcenter, 5, f"round {round_}")
        sent += [f"round {round_} {i}" for i in range(5)]
        assert messages(drain(reader, polls=STALL_POLLS + 1)) == sent[-5:]
    assert reader.resets >= 2  # the first round may come with the first page of history
    reader.close()


# --- bounded polls: pure logic, with a stand-in collector that pages like vCenter

class ForwardCollector:
    """``ReadNextEvents`` forward from the position, ``latestPage`` the newest events."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.position = 0
        self.calls = 0

    def SetCollectorPageSize(self, size: int) -> None:  # noqa: N802 - vSphere's name
        pass

    def ReadNextEvents(self, max_count: int) -> list:  # noqa: N802
        self.calls += 1
        page = self.log[self.position:self.position + max_count]
        self.position += len(page)
        return page

    def DestroyCollector(self) -> None:  # noqa: N802
        pass


def test_a_huge_backlog_streams_in_bounded_polls() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    log = [vim.event.GeneralUserEvent(key=k, chainId=k, createdTime=start + timedelta(seconds=k))
           for k in range(1, 12_001)]
    collector = ForwardCollector(log)
    content = SimpleNamespace(eventManager=SimpleNamespace(
        CreateCollectorForEvents=lambda spec: collector))
    reader = EventReader(content, begin=start, seen=SeenKeys())
    reader.newest_key = lambda: log[-1].key  # what the watchdog would read from vCenter
    sizes = []
    while batch := reader.poll():
        sizes.append(len(batch))
        reader.confirmed([e.key for e in batch], begin=batch[-1].createdTime)
    assert sizes == [MAX_EVENTS_PER_POLL, MAX_EVENTS_PER_POLL, 2000]
    assert collector.calls == 5 + 5 + 3 + 1  # pages of 1,000; an empty page ends a catch-up
