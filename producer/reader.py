"""Reading vCenter's event stream incrementally from an ``EventHistoryCollector``.

A real vCenter pages ``ReadNextEvents`` forward in key order, so draining it after each poll
gives every new event exactly once; that is all this reader does by default. govmomi's simulator
(the test peer) does not: it returns one page of history, and after that shows new events only in
the collector's ``latestPage`` — and not reliably all of them. With ``latest_page_fallback`` (set
``VCENTER_LATEST_PAGE_FALLBACK=true`` for a simulator) the reader also reads ``latestPage`` and,
when it shows new events with keys missing in between, reads the window again through a second,
rewound collector (whose first page holds the simulator's whole, at most 1,000-event,
history). Either way, events are de-duplicated by key, filtered by creation time (the simulator
ignores the time filter), and returned in key order.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime

from pyVmomi import vim

logger = logging.getLogger("vebaq.producer")

#: How many recent event keys are remembered to recognise events read twice.
SEEN_KEYS = 100_000

#: vCenter's largest page (``SetCollectorPageSize``): used to drain backlogs and fill gaps.
MAX_PAGE_SIZE = 1000

#: At most this many events are read per poll, so a huge backlog streams through in bounded
#: memory (the producer polls again at once while :attr:`EventReader.more_waiting`).
MAX_EVENTS_PER_POLL = 5000


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


def _span(events: Iterable[vim.event.Event]) -> str:
    keys = [e.key for e in events]
    return f"keys {min(keys)}–{max(keys)}" if keys else "none"


def _created(event: vim.event.Event) -> datetime:
    created = event.createdTime
    return created if created.tzinfo else created.replace(tzinfo=UTC)


class EventReader:
    """New events of one vCenter, in key order, each once.

    :param content: the session's ``ServiceInstanceContent``.
    :param begin: the collector's time filter: read events created since then (vCenter's clock).
    :param floor: never return events created before this (defaults to ``begin``).
    :param seen: keys already published (restored from the checkpoint after a restart).
    :param page_size: events per ``ReadNextEvents`` call (and the collector's page size);
        the largest with ``latest_page_fallback``.
    :param latest_page_fallback: also read ``latestPage``, for simulators (see the module
        docstring); costs a read of up to ``page_size`` events per poll.
    """

    def __init__(self, content: vim.ServiceInstanceContent, *, begin: datetime, seen: SeenKeys,
                 floor: datetime | None = None, page_size: int = MAX_PAGE_SIZE,
                 latest_page_fallback: bool = False) -> None:
        self.content = content
        self.begin = begin
        #: Events created before this are never returned (the simulator ignores time filters).
        self.floor = floor or begin
        self.seen = seen
        # The simulator shows its history in a collector's first page only: make it all of it.
        self.page_size = MAX_PAGE_SIZE if latest_page_fallback else page_size
        self.latest_page_fallback = latest_page_fallback
        self.collector: vim.event.EventHistoryCollector | None = None
        self.window: vim.event.EventHistoryCollector | None = None
        #: The last poll stopped at MAX_EVENTS_PER_POLL with more events waiting.
        self.more_waiting = False

    def _create_collector(self, page_size: int) -> vim.event.EventHistoryCollector:
        spec = vim.event.EventFilterSpec(
            entity=vim.event.EventFilterSpec.ByEntity(entity=self.content.rootFolder,
                                                      recursion="all"),
            time=vim.event.EventFilterSpec.ByTime(beginTime=self.begin),
        )
        collector = self.content.eventManager.CreateCollectorForEvents(spec)
        collector.SetCollectorPageSize(page_size)
        return collector

    def open(self) -> None:
        """(Re)create the collector: root folder, all descendants, events since ``begin``.

        Its page size stays as created: the simulator's collector misbehaves after a change."""
        self.close()
        self.collector = self._create_collector(self.page_size)
        if self.latest_page_fallback:
            # A second collector, rewound to re-read the window: creating and destroying one
            # per re-read can deadlock govmomi 0.24's simulator (DestroyCollector and PostEvent
            # take its two locks in opposite orders).
            self.window = self._create_collector(MAX_PAGE_SIZE)

    def close(self) -> None:
        for collector in (self.collector, self.window):
            if collector is not None:
                with contextlib.suppress(Exception):  # the session may be gone already
                    collector.DestroyCollector()
        self.collector = self.window = None

    @staticmethod
    def _read_forward(collector: vim.event.EventHistoryCollector, page_size: int,
                      limit: int | None = None) -> tuple[list[vim.event.Event], bool]:
        """Pages forward until caught up or ``limit`` events; returns (events, more_waiting)."""
        events: list[vim.event.Event] = []
        while True:
            page = collector.ReadNextEvents(page_size)
            events.extend(page or ())
            if not page or len(page) < page_size:
                return events, False
            if limit is not None and len(events) >= limit:
                return events, True

    def poll(self) -> list[vim.event.Event]:
        """Every event not returned before, oldest key first."""
        if self.collector is None:
            self.open()
        forward, more = self._read_forward(self.collector, self.page_size,
                                           limit=MAX_EVENTS_PER_POLL)
        self.more_waiting = more
        events = list(forward)
        if not more and self.latest_page_fallback:
            latest = list(self.collector.latestPage or ())
            events.extend(latest)
            read = {e.key for e in forward}
            missed_by_paging = any(key not in read for key in self._new(latest))
            if missed_by_paging and self._holes(self._new(events)):
                # The simulator neither pages new events forward nor keeps latestPage
                # complete, but a rewound collector's first page holds its whole (≤1000)
                # history: read that when keys are missing.
                events.extend(self._reread_window())
        fresh = self._new(events)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("poll: %d forward (%s), %d read in all, %d new (%s); highest seen %d",
                         len(forward), _span(forward), len(events), len(fresh),
                         _span(fresh.values()), self.seen.highest)
        return [fresh[key] for key in sorted(fresh)]

    def _new(self, events: Iterable[vim.event.Event]) -> dict[int, vim.event.Event]:
        """The events not returned before and not older than :attr:`floor`, by key."""
        new: dict[int, vim.event.Event] = {}
        for event in events:
            if event.key not in self.seen and event.key not in new and (
                    event.createdTime is None or _created(event) >= self.floor):
                new[event.key] = event
        return new

    def _holes(self, new_keys: Iterable[int]) -> bool:
        """Are keys missing between the newest confirmed key and the new ones? (With the
        whole inventory as the filter's scope, a vCenter's event keys are consecutive.)"""
        keys = sorted(new_keys)
        if self.seen.highest >= 0:
            keys = [self.seen.highest, *(k for k in keys if k > self.seen.highest)]
        return any(b - a > 1 for a, b in zip(keys, keys[1:], strict=False))

    def _reread_window(self) -> list[vim.event.Event]:
        """The simulator's whole (≤1000-event) history, newest included."""
        self.window.RewindCollector()
        forward, _ = self._read_forward(self.window, MAX_PAGE_SIZE)
        return forward

    def confirmed(self, keys: Iterable[int], begin: datetime) -> None:
        """Events with ``keys`` were published; a re-created collector starts at ``begin``."""
        for key in keys:
            self.seen.add(key)
        self.begin = max(self.begin, begin)
