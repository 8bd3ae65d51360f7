"""Bounded work per event: a 1 MiB event without white space through a real echo worker.

The echo function logs the whole event, and every log line goes through the secret scrubber;
the old scrubber was quadratic on such a token and held the worker for minutes. An event just
under ``maxEventBytes`` (1 MiB by default) must be echoed, one over it dead-lettered unrun, and
the small events sent after both must not wait behind them.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import redis

from tests import flaky_functions as flaky
from tests.support import start_worker, wait_until
from vebaq.core import deadletters
from vebaq.core.config import DEFAULT_MAX_EVENT_BYTES
from vebaq.core.messages import queue_for
from workers.app import create_app
from workers.execution import event_bytes

pytestmark = pytest.mark.slow


def blob_event(size: int) -> dict:
    """A structured event of exactly ``size`` bytes whose data is one token dense with URLs
    that carry passwords: the scrubber's hardest case."""
    unit = "https://user:pw@host/"
    event = flaky.structured_event("GeneralUserEvent", {"Message": ""})
    overhead = event_bytes(event)
    event["data"]["Message"] = (unit * (size // len(unit) + 1))[:size - overhead]
    assert event_bytes(event) == size
    return event


def succeeded_at(log: str, task_id: str) -> float | None:
    """When the worker logged the task's success (seconds since the epoch)."""
    match = re.search(rf"\[(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}): INFO/[\w-]+\] "
                      rf"Task GeneralUserEvent\[{re.escape(task_id)}\] succeeded", log)
    if not match:
        return None
    return time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + \
        int(match.group(1)[20:]) / 1000


def test_a_1_mib_event_is_echoed_or_dead_lettered_quickly_and_holds_nothing_back(
        redis_url: str, redis_client: redis.Redis, log_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_"))}
    env.update(VEBAQ_BROKER_URL=redis_url, PYTHONUNBUFFERED="1")
    worker = start_worker("echo", env, log_dir, concurrency=1, extra=flaky.QUICK_START)
    app = create_app(broker_url=redis_url)
    echo = queue_for("echo")

    def send(event: dict) -> str:
        return app.send_task("GeneralUserEvent", kwargs={"event": event, "pool": "echo"},
                             queue=echo, kwargsrepr="{…}").id

    try:
        under, over = blob_event(DEFAULT_MAX_EVENT_BYTES - 1024), blob_event(
            DEFAULT_MAX_EVENT_BYTES + 1024)
        sent = time.time()
        big = send(under)
        send(over)
        small = [send(flaky.structured_event("GeneralUserEvent", {"Message": f"small {i}"}))
                 for i in range(20)]
        wait_until(lambda: all(succeeded_at(worker.log(), t) for t in [big, *small]), 120,
                   "the 1 MiB event and the 20 after it echoed")
        wait_until(lambda: deadletters.depth(redis_client) == 1, 30, "the oversized dead letter")
        log = worker.log()
    finally:
        worker.stop()
        app.close()
    [letter] = deadletters.list_letters(redis_client)
    big_done = succeeded_at(log, big) - sent
    last_small = max(succeeded_at(log, t) for t in small) - sent
    print(f"\n[1 MiB event, echo -c 1] {DEFAULT_MAX_EVENT_BYTES - 1024:,} B echoed "
          f"{big_done:.2f}s after sending; {DEFAULT_MAX_EVENT_BYTES + 1024:,} B dead-lettered "
          f"({letter['error']}); the 20 small events after them done {last_small:.2f}s after "
          "sending")
    assert letter["exception"] == "EventTooLarge" and letter["function"] is None
    assert letter["error"] == (f"the event is {DEFAULT_MAX_EVENT_BYTES + 1024:,} bytes, more "
                               f"than pools.echo.maxEventBytes ({DEFAULT_MAX_EVENT_BYTES:,}): "
                               "no function ran")
    assert letter["event"] == over  # kept whole: replayable once the limit is raised
    assert "https://user:***@host/" in log and "user:pw@" not in log  # scrubbed, all of it
