"""Reading vCenter's event stream incrementally from an ``EventHistoryCollector``.

A real vCenter pages ``ReadNextEvents`` forward in key order, so draining it after each poll
gives every new event exactly once. govmomi's simulator (the test peer) does not page new events
forward, but keeps the collector's ``latestPage`` current; with ``latest_page_fallback`` the
reader also reads ``latestPage`` and merges both. Either way, events are de-duplicated by their
key, filtered by creation time (the simulator ignores the collector's time filter), and returned
in key order.
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

#: vCenter's largest page (``SetCollectorPageSize``); used to re-read after a suspected gap.
MAX_PAGE_SIZE = 1000


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


def _created(event: vim.event.Event) -> datetime:
    created = event.createdTime
    return created if created.tzinfo else created.replace(tzinfo=UTC)


class EventReader:
    """New events of one vCenter, in key order, each once.

    :param content: the session's ``ServiceInstanceContent``.
    :param begin: the collector's time filter: read events created since then (vCenter's clock).
    :param floor: never return events created before this (defaults to ``begin``).
    :param seen: keys already published (restored from the checkpoint after a restart).
    :param page_size: events per ``ReadNextEvents`` call.
    :param latest_page_fallback: also read ``latestPage`` (see the module docstring).
    """

    def __init__(self, content: vim.ServiceInstanceContent, *, begin: datetime, seen: SeenKeys,
                 floor: datetime | None = None, page_size: int = 100,
                 latest_page_fallback: bool = True) -> None:
        self.content = content
        self.begin = begin
        #: Events created before this are never returned (the simulator ignores time filters).
        self.floor = floor or begin
        self.seen = seen
        self.page_size = page_size
        self.latest_page_fallback = latest_page_fallback
        self.collector: vim.event.EventHistoryCollector | None = None

    def open(self, page_size: int | None = None) -> None:
        """(Re)create the collector: root folder, all descendants, events since ``begin``."""
        self.close()
        spec = vim.event.EventFilterSpec(
            entity=vim.event.EventFilterSpec.ByEntity(entity=self.content.rootFolder,
                                                      recursion="all"),
            time=vim.event.EventFilterSpec.ByTime(beginTime=self.begin),
        )
        self.collector = self.content.eventManager.CreateCollectorForEvents(spec)
        self.collector.SetCollectorPageSize(page_size or self.page_size)

    def close(self) -> None:
        if self.collector is not None:
            with contextlib.suppress(Exception):  # the session may be gone already
                self.collector.DestroyCollector()
            self.collector = None

    def _read_forward(self, page_size: int | None = None) -> list[vim.event.Event]:
        page_size = page_size or self.page_size
        events: list[vim.event.Event] = []
        while True:
            page = self.collector.ReadNextEvents(page_size)
            events.extend(page or ())
            if not page or len(page) < page_size:
                return events

    def poll(self) -> list[vim.event.Event]:
        """Every event not returned before, oldest key first."""
        if self.collector is None:
            self.open()
        events = self._read_forward()
        if self.latest_page_fallback:
            latest = list(self.collector.latestPage or ())
            if self._gap_suspected(latest, events):
                logger.warning("more new events than one latestPage holds: re-reading the "
                               "collector's window to fill the gap")
                self.open(page_size=MAX_PAGE_SIZE)
                events.extend(self._read_forward(MAX_PAGE_SIZE))
                events.extend(self.collector.latestPage or ())
                self.collector.SetCollectorPageSize(self.page_size)
            events.extend(latest)
        fresh: dict[int, vim.event.Event] = {}
        for event in events:
            key = event.key
            if key in self.seen or key in fresh:
                continue
            if event.createdTime is not None and _created(event) < self.floor:
                continue
            fresh[key] = event
        return [fresh[key] for key in sorted(fresh)]

    def _gap_suspected(self, latest: list[vim.event.Event],
                       forward: list[vim.event.Event]) -> bool:
        """A full latestPage holding only unseen keys, none of them just read forward, may
        have pushed older new events out of view."""
        if self.seen.highest < 0 or len(latest) < self.page_size:
            return False
        keys = {e.key for e in latest}
        read = {e.key for e in forward}
        return not any(k in self.seen or k in read for k in keys) and min(keys) > \
            self.seen.highest + 1

    def confirmed(self, keys: Iterable[int], begin: datetime) -> None:
        """Events with ``keys`` were published; a re-created collector starts at ``begin``."""
        for key in keys:
            self.seen.add(key)
        self.begin = max(self.begin, begin)
