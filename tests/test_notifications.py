"""Waking on vCenter's change notifications (``WaitForUpdatesEx`` on ``latestEvent``) instead of
waiting for the next poll — and polling where a vCenter does not notify.

The test peer's property collector answers a wait as soon as the watched property changes, as
vCenter does; with ``-legacy-events`` it is Debian's govmomi 0.24, which never sets
``latestEvent``: the fallback path. Each path must deliver every event once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.notifications import SILENT_WAITS, ChangeNotifier
from tests.support import (
    Simulator,
    VCenter,
    all_enqueued,
    build_vcsim,
    post,
    report,
    start_producer,
    wait_until,
)


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator(build_vcsim(), tmp_path, "-legacy-events")
    yield sim
    sim.stop()


def env_for(stack_env: dict[str, str], tmp_path: Path, url: str, config: str = "",
            **extra: str) -> dict[str, str]:
    path = tmp_path / "vebaq.yaml"
    path.write_text("triggers: [{name: all, pool: echo}]\n" + config)
    return {**stack_env, "VCENTER_URL": url, "VEBAQ_CONFIG": str(path), **extra}


def test_a_wait_returns_when_an_event_is_posted(vcenter: VCenter) -> None:
    notifier = ChangeNotifier(vcenter.content)
    stop = threading.Event()
    notifier.wait(1, stop)  # creates the filter, takes the current value
    poster = threading.Timer(0.5, lambda: post(vcenter, 1, "wake"))
    poster.start()
    started = time.monotonic()
    notifier.wait(30, stop)
    waited = time.monotonic() - started
    poster.join()
    notifier.close()
    assert waited < 10, f"the wait did not end with the event ({waited:.1f}s)"
    assert notifier.working


@pytest.mark.slow
def test_the_producer_reads_on_the_notification_not_at_the_next_poll(
        stack_env: dict[str, str], vcsim: str, tmp_path: Path, log_dir: Path,
        redis_client: redis.Redis, vcenter: VCenter) -> None:
    """A poll interval of a minute: events still arrive at once (the poll would take 60 s)."""
    env = env_for(stack_env, tmp_path, vcsim, "vcenter: {maxPollInterval: 60s}\n",
                  VCENTER_POLL_INTERVAL="60s")
    producer = start_producer(env, log_dir)
    time.sleep(1)  # let it settle into its first wait
    sent = []
    for round_ in range(5):
        batch = post(vcenter, 3, f"round {round_}")
        sent += batch
        wait_until(lambda b=batch: all_enqueued(redis_client, b), 15,
                   f"round {round_} enqueued long before the next poll")
    time.sleep(1)
    producer.stop()
    assert report("notifications, 60 s poll", sent, redis_client) == (0, 0)
    assert "does not notify" not in producer.log()


@pytest.mark.slow
def test_a_vcenter_that_does_not_notify_is_polled(
        stack_env: dict[str, str], legacy: Simulator, tmp_path: Path, log_dir: Path,
        redis_client: redis.Redis) -> None:
    """Debian's govmomi 0.24 never changes latestEvent: the waits time out although new events
    came; after a few the producer says so once and polls at its interval."""
    vcenter = VCenter(legacy.url)
    env = env_for(stack_env, tmp_path, legacy.url, "vcenter: {maxPollInterval: 0.3s}\n",
                  VCENTER_POLL_INTERVAL="0.3s")
    producer = start_producer(env, log_dir)
    sent = []
    for round_ in range(SILENT_WAITS + 3):
        batch = post(vcenter, 3, f"round {round_}")
        sent += batch
        wait_until(lambda b=batch: all_enqueued(redis_client, b), 30, f"round {round_}")
    time.sleep(1)
    producer.stop()
    assert report("no notifications (legacy simulator)", sent, redis_client) == (0, 0)
    assert producer.log().count("does not notify changes") == 1


@pytest.mark.slow
def test_notifications_can_be_turned_off(stack_env: dict[str, str], vcsim: str, tmp_path: Path,
                                         log_dir: Path, redis_client: redis.Redis,
                                         vcenter: VCenter) -> None:
    env = env_for(stack_env, tmp_path, vcsim, VCENTER_NOTIFICATIONS="false")
    producer = start_producer(env, log_dir)
    sent = post(vcenter, 5, "polled")
    wait_until(lambda: all_enqueued(redis_client, sent), 30, "events enqueued by polling")
    producer.stop()
    assert report("notifications off", sent, redis_client) == (0, 0)
