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

The wait never replaces reading: whatever it says, the reader pages forward afterwards and its
stall watchdog stays in force, so a lost or late notification costs at most one poll interval
(``maxWaitSeconds`` is that interval). A vCenter or simulator that does not notify — a fault on
``CreateFilter``/``WaitForUpdatesEx``, or waits that keep timing out while polls find new events
(Debian's govmomi 0.24 never sets ``latestEvent``) — is detected, logged once, and the producer
polls at its interval from then on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading

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
        return True

    def wait(self, seconds: float, stop: threading.Event) -> None:
        """Until a new event or ``seconds`` pass (or ``stop`` is set, checked before waiting).

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
            changed = self._wait_for_updates(max(1, math.ceil(seconds)))
        except vmodl.MethodFault as fault:
            if isinstance(fault, SESSION_LOST):
                raise
            self._give_up(f"{type(fault).__name__}: {fault.msg}")
            stop.wait(seconds)
            return
        self._last_timed_out = not changed

    def polled(self, found_new: bool) -> None:
        """What the poll after a wait found: new events after a wait that timed out, again and
        again, mean that notifications do not come."""
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
