"""Waking the reader when vCenter has a new event, instead of at the next poll.

vCenter's ``PropertyCollector.WaitForUpdatesEx`` returns as soon as a property it watches
changes, or after ``maxWaitSeconds``. :class:`ChangeNotifier` watches
``EventManager.latestEvent``, which changes with every new event, and the producer waits on it
between polls (:meth:`ChangeNotifier.wait`): an event is read as soon as it happens, and an idle
vCenter is asked less often than by polling.

Why ``latestEvent`` and not the collector's ``latestPage``: an update carries the property's new
value, and ``latestPage`` is the collector's whole page (up to 1,000 events) on every change;
``latestEvent`` is one event, and it does not depend on which collector the reader has (a
replaced collector needs no new filter).

**Quiet vCenters are asked less.** Each update carries ``latestEvent``'s new value, so the
notifier knows vCenter's newest event key. While that is a key the reader already has and waits
keep timing out, there is nothing to read: :meth:`ChangeNotifier.wait` waits on (one
``WaitForUpdatesEx`` of the poll interval after another) instead of returning for a poll that
would find nothing — up to ``quiet_limit`` seconds after the last poll (the producer passes
``vcenter.maxPollInterval``). A quiet producer then costs vCenter one call per poll interval
and a poll (``ReadNextEvents`` and the watchdog's ``latestEvent`` read) every ``quiet_limit``,
instead of three calls per poll interval; polling alone costs two per interval.

The wait never replaces reading for long: the reader still pages forward after it returns, at
least every ``quiet_limit``, and its stall watchdog stays in force, so a lost or late
notification costs at most ``quiet_limit`` (5 s by default). A vCenter or simulator that does not
notify — a fault on ``CreateFilter``/``WaitForUpdatesEx``, or waits that keep timing out while
polls find new events (Debian's govmomi 0.24 never sets ``latestEvent``) — is detected, logged
once, and the producer polls at its interval from then on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time

from pyVmomi import vim, vmodl

from producer.vcenter import SESSION_LOST

logger = logging.getLogger("vebaq.producer")

#: Waits in a row that timed out although the poll after them found new events, before the
#: notifier decides that this vCenter does not notify.
SILENT_WAITS = 3


class ChangeNotifier:
    """Waits for ``EventManager.latestEvent`` to change (see the module docstring).

    :param content: the session's ``ServiceInstanceContent``.
    """

    def __init__(self, content: vim.ServiceInstanceContent) -> None:
        self.content = content
        #: False once this vCenter was found not to notify: then :meth:`wait` only sleeps.
        self.working = True
        self._filter: vmodl.query.PropertyCollector.Filter | None = None
        self._version = ""
        self._silent = 0
        self._last_timed_out = False
        #: vCenter's newest event key as the last update said (``None``: not known).
        self.latest_key: int | None = None
        self._polled_at = time.monotonic()

    def _create_filter(self) -> None:
        spec = vim.PropertyCollector.FilterSpec(
            objectSet=[vim.PropertyCollector.ObjectSpec(obj=self.content.eventManager)],
            propSet=[vim.PropertyCollector.PropertySpec(type=vim.event.EventManager,
                                                        pathSet=["latestEvent"])])
        self._filter = self.content.propertyCollector.CreateFilter(spec, partialUpdates=False)
        # The first wait answers at once with the current value: take it now.
        self._version = ""
        self._wait_for_updates(0)

    def _wait_for_updates(self, seconds: int) -> bool:
        """One ``WaitForUpdatesEx``; True if something changed."""
        options = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=seconds)
        update = self.content.propertyCollector.WaitForUpdatesEx(self._version, options)
        if update is None:
            return False
        self._version = update.version
        for found in update.filterSet or ():
            for changed in found.objectSet or ():
                for change in changed.changeSet or ():
                    if change.name == "latestEvent":
                        self.latest_key = getattr(change.val, "key", None)
        return True

    def wait(self, seconds: float, stop: threading.Event, known: int | None = None,
             quiet_limit: float | None = None) -> None:
        """Until a new event or ``seconds`` pass (or ``stop`` is set, checked before waiting).

        :param known: the highest event key the reader is done with: while vCenter's newest is
            no newer, waiting goes on (see the module docstring) …
        :param quiet_limit: … until this many seconds after the last poll (:meth:`polled`).

        Session and connection failures propagate (the caller reconnects); anything else means
        this vCenter does not notify: logged once, then plain sleeps."""
        if stop.is_set():
            return
        if not self.working:
            stop.wait(seconds)
            return
        try:
            if self._filter is None:
                self._create_filter()
            each = max(1, math.ceil(seconds))
            while True:
                changed = self._wait_for_updates(each)
                if changed or stop.is_set() or not self._nothing_new(known, quiet_limit, each):
                    break
        except vmodl.MethodFault as fault:
            if isinstance(fault, SESSION_LOST):
                raise
            self._give_up(f"{type(fault).__name__}: {fault.msg}")
            stop.wait(seconds)
            return
        self._last_timed_out = not changed

    def _nothing_new(self, known: int | None, quiet_limit: float | None, wait: int) -> bool:
        """vCenter's newest event is one the reader has, and another wait of ``wait`` seconds
        still ends within ``quiet_limit`` of the last poll."""
        return (known is not None and quiet_limit is not None and self.latest_key is not None
                and self.latest_key <= known
                and time.monotonic() - self._polled_at + wait <= quiet_limit)

    def polled(self, found_new: bool) -> None:
        """What the poll after a wait found: new events after a wait that timed out, again and
        again, mean that notifications do not come."""
        self._polled_at = time.monotonic()
        if not self.working:
            return
        if self._last_timed_out and found_new:
            self._silent += 1
            if self._silent >= SILENT_WAITS:
                self._give_up(f"{SILENT_WAITS} waits timed out although new events had come")
        elif found_new:
            self._silent = 0
        self._last_timed_out = False

    def _give_up(self, why: str) -> None:
        self.working = False
        logger.warning("vCenter does not notify changes of EventManager.latestEvent (%s): "
                       "polling at the poll interval instead", why)
        self.close()

    def close(self) -> None:
        """Destroy the filter (best effort: the session may be gone)."""
        filter_, self._filter = self._filter, None
        if filter_ is not None:
            with contextlib.suppress(Exception):
                filter_.DestroyPropertyFilter()
