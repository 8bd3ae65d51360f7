"""Reading vCenter's event stream incrementally from an ``EventHistoryCollector``.

vCenter pages ``ReadNextEvents`` forward in key order from the collector's position, and
appends events posted after the collector was created: draining it after each poll gives every
new event once. That is the one path this reader takes. Unless a filter is pushed down
(below), the collector reads every event (so vCenter's newest event is always one it should
return), created since ``begin`` (the checkpoint's time minus an overlap); events are
de-duplicated by key against the published window (``seen``), filtered by creation time
(``floor``), and returned in key order.

**A collector can stop returning events without saying so.** Current govmomi marks a collector
more than ~1,000 unread events behind as stale and returns nothing from it ever again; VEBA's
users saw a router read ~100 events from a real vCenter and then nothing. So after every poll
that returned nothing new, the *watchdog* compares vCenter's newest event key
(``EventManager.latestEvent``, one cheap property read) with the highest key this reader has
seen. When vCenter holds events the collector does not return for :data:`STALL_POLLS` polls in a
row, the reader logs one WARNING line, destroys the collector, creates a new one from ``begin``
and reads again at once — the keys already published are skipped, so nothing doubles. While the
gap persists, :attr:`EventReader.stall` says so (``/healthz`` reports degraded with it). If the
new collector's first event is past the next key expected, vCenter no longer holds the events in
between (its retention ran out, or ``checkpoint.maxAge`` cut them): one ERROR line and
:attr:`EventReader.skipped` say how many — never silence.

**Collector hygiene.** At most one live collector per reader; it is destroyed on replacement and
on :meth:`close` — which the producer also calls before it gives up a session after a dropped
connection, since that session (and its collector) lives on in vCenter: govmomi counts every
collector not destroyed against its limit of 32, and the 33rd login's collector would fail.
Collectors are per session, so a session the server ended cannot have its collector destroyed
by another: vCenter frees those itself. ``SetCollectorPageSize`` is called only at creation
(govmomi's collector never sees new events again after a later change).

**Pushdown** (:mod:`producer.pushdown`): the collector may carry a filter derived from the
triggers, so vCenter returns only events some trigger may match. vCenter's newest event is then
often one the collector rightly never returns, so the watchdog compares the collector's own
newest matching event (``latestPage``, read only when ``latestEvent`` moved past what the reader
knows) instead; and the keys between two matching events are expected gaps: the continuity
check after a reset asks an unfiltered probe collector (one event, destroyed at once) whether
vCenter still holds the first key past the reader's, and reports only what it no longer holds.
A pushed-down filter vCenter refuses (an entity that no longer exists) is logged once and
dropped: the reader reads everything, the triggers route as before.

Older simulators (Debian's govmomi 0.24, the ``vmware/vcsim`` stand-in on some machines) page
no new events forward and never set ``latestEvent``; the watchdog then reads the collector's
``latestPage`` instead (logged once) and its resets deliver the new events, two polls late.
govmomi 0.24's ``DestroyCollector`` can deadlock against a concurrent ``PostEvent`` (they take
the manager's and the collector's locks in opposite orders); resets are rare with a simulator
that pages forward, and the SOAP timeout turns a hang into a reconnect instead of a stuck reader.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pyVmomi import vim, vmodl

from producer.pushdown import Pushdown

logger = logging.getLogger("vebaq.producer")

#: How many recent event keys are remembered to recognise events read twice.
SEEN_KEYS = 100_000

#: vCenter's largest page (``SetCollectorPageSize``).
MAX_PAGE_SIZE = 1000

#: At most this many events are read per poll, so a huge backlog streams through in bounded
#: memory (the producer polls again at once while :attr:`EventReader.more_waiting`).
MAX_EVENTS_PER_POLL = 5000

#: Polls in a row that returned nothing while vCenter had newer events, before the collector is
#: replaced. Two: one such poll happens whenever an event lands between the read and the check.
STALL_POLLS = 2

#: Seconds between two WARNING lines about resets of one stall that does not clear (each reset
#: is counted all the same).
RESET_LOG_INTERVAL = 60.0


class SeenKeys:
    """A bounded set of recently read event keys (oldest forgotten first)."""

    def __init__(self, keys: Iterable[int] = (), limit: int = SEEN_KEYS) -> None:
        self._order: deque[int] = deque()
        self._keys: set[int] = set()
        self.limit = limit
        self.highest = -1
        for key in sorted(keys):
            self.add(key)

    def __contains__(self, key: int) -> bool:
        return key in self._keys

    def add(self, key: int) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        self.highest = max(self.highest, key)
        if len(self._order) > self.limit:
            self._keys.discard(self._order.popleft())


@dataclass(frozen=True)
class Stall:
    """vCenter holds events the collector does not return.

    :param newest: vCenter's newest event key; :param highest: the highest key read;
    :param since: when it was first noticed (epoch seconds).
    """

    newest: int
    highest: int
    since: float

    @property
    def gap(self) -> int:
        return self.newest - self.highest

    def describe(self) -> str:
        return (f"vCenter's newest event is key {self.newest} but the collector returned "
                f"nothing past key {self.highest} ({self.gap} event(s) behind)")


def _created(event: vim.event.Event) -> datetime:
    created = event.createdTime
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def _fault(exc: BaseException) -> str:
    """A vSphere fault in one line: its name, and its message or the object it names."""
    name = getattr(exc, "_wsdlName", None) or type(exc).__name__
    detail = getattr(exc, "msg", "") or getattr(exc, "obj", "") or ""
    if not detail and not hasattr(exc, "_wsdlName"):
        detail = str(exc)
    return " ".join(f"{name}: {detail}".split()) if detail else name


class EventReader:
    """New events of one vCenter, in key order, each once.

    :param content: the session's ``ServiceInstanceContent``.
    :param begin: the collector's time filter: read events created since then (vCenter's clock).
    :param floor: never return events created before this (defaults to ``begin``).
    :param seen: keys already published (restored from the checkpoint after a restart).
    :param page_size: events per ``ReadNextEvents`` call (and the collector's page size).
    :param pushdown: the filter to ask vCenter for (:mod:`producer.pushdown`); ``None``: every
        event.
    """

    def __init__(self, content: vim.ServiceInstanceContent, *, begin: datetime, seen: SeenKeys,
                 floor: datetime | None = None, page_size: int = MAX_PAGE_SIZE,
                 pushdown: Pushdown | None = None) -> None:
        self.content = content
        self.pushdown = pushdown
        #: (latestEvent's key, the newest matching key) when latestPage was last read.
        self._latest_checked: tuple[int | None, int | None] = (-1, None)
        self.begin = begin
        #: Events created before this are never returned (some simulators ignore time filters).
        self.floor = floor or begin
        self.seen = seen
        self.page_size = page_size
        self.collector: vim.event.EventHistoryCollector | None = None
        #: The last poll stopped at :data:`MAX_EVENTS_PER_POLL` with more events waiting.
        self.more_waiting = False
        #: The current stall: vCenter held events the collector did not return for
        #: :data:`STALL_POLLS` polls, and the reader has not caught up since.
        self.stall: Stall | None = None
        self._suspect: Stall | None = None  # one empty poll with newer events in vCenter
        #: Collectors replaced because they stalled, and event keys vCenter no longer held.
        self.resets = 0
        self.skipped = 0
        self._empty_polls = 0
        self._reset_logged = 0.0
        self._check_continuity = False
        self._latest_event_missing_logged = False
        #: Keys up to this are not the reader's: vCenter's events from before ``begin`` on a
        #: first start (no key published yet), which the collector rightly never returns.
        self._baseline = -1

    # --- the collector

    def _create_collector(self, pushdown: bool = True) -> vim.event.EventHistoryCollector:
        manager = self.content.eventManager
        since = vim.event.EventFilterSpec.ByTime(beginTime=self.begin)
        if pushdown and self.pushdown is not None:
            spec = vim.event.EventFilterSpec(time=since,
                                             **self.pushdown.spec_fields(manager._stub))
            try:
                collector = manager.CreateCollectorForEvents(spec)
            except (vim.fault.VimFault, vmodl.fault.ManagedObjectNotFound,
                    vmodl.fault.InvalidArgument) as exc:
                logger.warning("vCenter refused the pushed-down filter (%s): reading every "
                               "event and routing them here instead", _fault(exc))
                self.pushdown = None
            else:
                collector.SetCollectorPageSize(self.page_size)
                return collector
        collector = manager.CreateCollectorForEvents(vim.event.EventFilterSpec(time=since))
        collector.SetCollectorPageSize(self.page_size)
        return collector

    def open(self) -> None:
        """(Re)create the collector: every event since ``begin``."""
        self.close()
        self.collector = self._create_collector()
        self._latest_checked = (-1, None)
        if self.seen.highest < 0 and self._baseline < 0:
            self._baseline = self.newest_key() or -1

    @property
    def _known(self) -> int:
        """The highest key the reader is done with: read, or from before its start."""
        return max(self.seen.highest, self._baseline)

    @property
    def known(self) -> int:
        """The highest event key this reader is done with (read and confirmed, or from before
        its start); -1 for none."""
        return self._known

    def close(self) -> None:
        """Destroy the collector (best effort: the session may be gone already)."""
        collector, self.collector = self.collector, None
        if collector is not None:
            with contextlib.suppress(Exception):
                collector.DestroyCollector()

    def reattach(self, content: vim.ServiceInstanceContent) -> None:
        """Read on through a new session: a new collector from ``begin`` (the old one belonged
        to the old session; :meth:`close` it through that session first, while it may live)."""
        self.collector = None
        self.content = content
        self.open()
        self._empty_polls = 0

    # --- reading

    def _read_forward(self) -> tuple[list[vim.event.Event], bool]:
        """Pages forward until caught up or :data:`MAX_EVENTS_PER_POLL`; (events, more)."""
        events: list[vim.event.Event] = []
        while True:
            page = self.collector.ReadNextEvents(self.page_size)
            events.extend(page or ())
            if not page or len(page) < self.page_size:
                return events, False
            if len(events) >= MAX_EVENTS_PER_POLL:
                return events, True

    def poll(self) -> list[vim.event.Event]:
        """Every event not returned before, oldest key first (see the module docstring)."""
        if self.collector is None:
            self.open()
        events, self.more_waiting = self._read_forward()
        fresh = self._new(events)
        if not fresh and not self.more_waiting:
            fresh = self._watch(fresh)
        if fresh and self._check_continuity:
            self._report_skipped(min(fresh))
        if fresh:
            self._empty_polls = 0
            self._suspect = None
            if self.stall is not None and max(fresh) >= self.stall.newest:
                logger.info("collector caught up: the gap of %d event(s) read %.1fs after it "
                            "was noticed", self.stall.gap, time.time() - self.stall.since)
                self.stall = None
        return [fresh[key] for key in sorted(fresh)]

    def _watch(self, fresh: dict[int, vim.event.Event]) -> dict[int, vim.event.Event]:
        """The watchdog, after a poll that returned nothing new: replace a stalled collector
        and read from the new one at once; returns what it read."""
        newest = self.newest_key()
        if newest is None or newest <= self._known:
            self._empty_polls = 0
            self._suspect = self.stall = None
            return fresh
        self._empty_polls += 1
        since = self._suspect.since if self._suspect else time.time()
        self._suspect = Stall(newest, self._known, since)
        if self._empty_polls < STALL_POLLS:
            return fresh  # an event may have landed between the read and the check
        self.stall = self._suspect
        self.resets += 1
        if time.monotonic() - self._reset_logged >= RESET_LOG_INTERVAL:
            self._reset_logged = time.monotonic()
            logger.warning("collector stalled: %s for %d polls; replacing it (reset %d), "
                           "reading again from %s", self.stall.describe(), self._empty_polls,
                           self.resets, self.begin.isoformat())
        self.open()
        self._empty_polls = 0
        self._check_continuity = self._known >= 0
        events, self.more_waiting = self._read_forward()
        fresh = self._new(events)
        if not fresh and not self.more_waiting:
            # A new collector cannot be stale: what vCenter holds past our keys is not ours to
            # read (created before `begin`/`floor`: the checkpoint's maxAge cut it).
            logger.warning("events up to key %d are older than the reader's start (%s): "
                           "not read", newest, self.floor.isoformat())
            self._baseline, self.stall, self._check_continuity = newest, None, False
        return fresh

    def _report_skipped(self, first: int) -> None:
        """The first event a new collector returned: are keys missing before it?"""
        self._check_continuity = False
        known = self._known
        if self.pushdown is not None and first - known > 1:
            # Keys between matching events are other events' (the filter's gaps): only what
            # vCenter no longer holds at all is missing.
            try:
                first = min(first, self._oldest_held_after(known))
            except Exception as exc:  # noqa: BLE001 - a check, not the read: say it, read on
                logger.warning("could not check whether vCenter still holds events %d–%d "
                               "(between the filter's matches): %s", known + 1, first - 1,
                               _fault(exc))
                return
        missing = first - known - 1
        if missing > 0:
            self.skipped += missing
            logger.error("vCenter no longer holds events %d–%d (its retention ran out, or they "
                         "are older than checkpoint.maxAge): %d event(s) skipped, never "
                         "delivered%s", known + 1, first - 1, missing,
                         " (at most: with the pushed-down filter some were no trigger's)"
                         if self.pushdown is not None else "")

    def _oldest_held_after(self, known: int) -> int:
        """The first key past ``known`` vCenter still holds, read through an unfiltered probe
        collector of one event from ``begin`` (destroyed at once)."""
        probe = self._create_collector(pushdown=False)
        try:
            while True:
                page = probe.ReadNextEvents(self.page_size)
                later = [e.key for e in page or () if e.key > known]
                if later:
                    return min(later)
                if not page or len(page) < self.page_size:
                    return known + 1  # nothing past `known`: nothing missing
        finally:
            with contextlib.suppress(Exception):
                probe.DestroyCollector()

    def newest_key(self) -> int | None:
        """The newest event key this reader should see: vCenter's (``EventManager.latestEvent``)
        or, with a pushed-down filter or on simulators that do not set it, the newest in the
        collector's ``latestPage`` (vCenter's newest *matching* event)."""
        latest = self.vcenter_newest_key()
        if self.pushdown is None:
            return latest if latest is not None else self._latest_page_key()
        if latest is not None and latest <= self._known:
            return latest  # no event at all past ours: nothing to compare
        if latest is None or latest != self._latest_checked[0]:
            # latestPage holds up to a page of events: read it only when vCenter has a new one.
            self._latest_checked = (latest, self._latest_page_key())
        return self._latest_checked[1]

    def vcenter_newest_key(self) -> int | None:
        """vCenter's newest event key, whatever the filter (``None``: not reported)."""
        latest = self._property(self.content.eventManager, "latestEvent")
        return latest.key if latest is not None else None

    def _latest_page_key(self) -> int | None:
        if not self._latest_event_missing_logged and self.pushdown is None:
            self._latest_event_missing_logged = True
            logger.info("vCenter does not report EventManager.latestEvent (an old simulator?): "
                        "the stall watchdog reads the collector's latestPage instead")
        if self.collector is None:
            return None
        page = self._property(self.collector, "latestPage")
        return max((e.key for e in page or ()), default=None)

    def _property(self, obj: vim.ManagedObject, name: str) -> object | None:
        """One property by ``RetrievePropertiesEx``: an unset one is ``None`` (pyvmomi's own
        property read crashes govmomi 0.24's simulator on an unset property)."""
        spec = vim.PropertyCollector.FilterSpec(
            objectSet=[vim.PropertyCollector.ObjectSpec(obj=obj)],
            propSet=[vim.PropertyCollector.PropertySpec(type=type(obj), pathSet=[name])])
        result = self.content.propertyCollector.RetrievePropertiesEx(
            [spec], vim.PropertyCollector.RetrieveOptions())
        for found in (result.objects if result else ()):
            for prop in found.propSet or ():
                if prop.name == name:
                    return prop.val
        return None

    def _new(self, events: Iterable[vim.event.Event]) -> dict[int, vim.event.Event]:
        """The events not returned before and not older than :attr:`floor`, by key."""
        new: dict[int, vim.event.Event] = {}
        for event in events:
            if event.key not in self.seen and event.key not in new and (
                    event.createdTime is None or _created(event) >= self.floor):
                new[event.key] = event
        return new

    def confirmed(self, keys: Iterable[int], begin: datetime) -> None:
        """Events with ``keys`` were published; a re-created collector starts at ``begin``."""
        for key in keys:
            self.seen.add(key)
        self.begin = max(self.begin, begin)
