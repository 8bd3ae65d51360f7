"""The notifier's waits on the simulator peer: an event ends a wait at once; a quiet vCenter is
asked once per wait and polled only every ``quiet_limit``; a reader behind vCenter polls after
each wait. (The producer-level paths are tests/test_notifications.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pyVmomi import vim

from producer import vcenter as vc_api
from producer.notifications import ChangeNotifier
from tests.support import VCenter
from vebaq.core import config


@pytest.fixture
def session(vcsim: str) -> Iterator[vc_api.Session]:
    settings = config.load(environ={"VCENTER_URL": vcsim, "VCENTER_USER": "vebaq",
                                    "VCENTER_PASSWORD": "pw"}).vcenter
    session = vc_api.connect(settings)
    yield session
    session.close()


def post(vc: VCenter, message: str) -> int:
    vc.post(vim.event.GeneralUserEvent(message=message))
    return vc.content.eventManager.latestEvent.key


def waits() -> int:
    return vc_api.calls("WaitForUpdatesEx")


def test_a_quiet_vcenter_is_asked_once_per_wait_until_the_quiet_limit(
        session: vc_api.Session, vcenter: VCenter) -> None:
    notifier = ChangeNotifier(session.content)
    newest = post(vcenter, "before")
    notifier.wait(1, threading.Event(), known=newest, quiet_limit=3.0)  # the filter, then on
    notifier.polled(found_new=False)
    before, started = waits(), time.monotonic()
    notifier.wait(1, threading.Event(), known=newest, quiet_limit=3.0)
    elapsed = time.monotonic() - started
    assert notifier.latest_key == newest
    # 1 s waits while a next one still ends within 3 s of the last poll: two, then a poll (the
    # upper bound only tells "returned for the poll" from "waited on": not a timing goal).
    assert 1.8 <= elapsed < 10, elapsed
    assert waits() - before == 2
    notifier.close()


def test_an_event_ends_a_quiet_wait_at_once(session: vc_api.Session, vcenter: VCenter) -> None:
    notifier = ChangeNotifier(session.content)
    newest = post(vcenter, "before")
    notifier.wait(1, threading.Event())  # the filter, and one wait
    notifier.polled(found_new=False)
    ended: list[float] = []
    waiter = threading.Thread(target=lambda: (
        notifier.wait(1, threading.Event(), known=newest, quiet_limit=30.0),
        ended.append(time.monotonic())))
    waiter.start()
    time.sleep(1.5)  # into its second wait
    posted_at = time.monotonic()
    key = post(vcenter, "wake up")
    waiter.join(10)
    assert ended and ended[0] - posted_at < 10  # the event, not the 30 s quiet limit
    assert notifier.latest_key == key
    notifier.close()


@pytest.mark.parametrize("behind", [True, False], ids=["reader-behind", "no-known-key"])
def test_a_wait_returns_after_one_interval_unless_nothing_is_new(
        session: vc_api.Session, vcenter: VCenter, behind: bool) -> None:
    notifier = ChangeNotifier(session.content)
    newest = post(vcenter, "before")
    known = newest - 1 if behind else None  # vCenter has an event the reader has not read
    notifier.wait(1, threading.Event(), known=known, quiet_limit=30.0)
    started = time.monotonic()
    notifier.wait(1, threading.Event(), known=known, quiet_limit=30.0)
    assert time.monotonic() - started < 15  # one interval, not the 30 s quiet limit
    notifier.close()
