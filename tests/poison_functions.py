"""Test-only ``poison`` pool (``VEBAQ_FUNCTIONS=tests.poison_functions``): functions that end
the process running them, or run too long, for the poison breaker and time-limit tests.

Every function counts its runs per event in the broker's Redis (:func:`runs_key`), so a test
sees how often a poison event was delivered to a function before the breaker stopped it:

* ``SigkillEvent``: ``os.kill(os.getpid(), SIGKILL)``;
* ``ExitEvent``: ``os._exit(1)``;
* ``HogEvent``: allocates memory, reports its process id (:data:`HOG_PIDS`) and waits to be
  killed from outside with SIGKILL, as the kernel's OOM killer does;
* ``TwoStepEvent``: ``step_one`` succeeds, then ``step_two`` kills its process;
* ``StubbornEvent``: sleeps, and ignores the soft time limit (the hard one must stop it);
* ``SleepyEvent``: sleeps ``data["seconds"]`` (the soft time limit interrupts it);
* ``GoodEvent``: succeeds (the other events that must keep flowing).

A ``task_postrun`` receiver also ends the pool child *after* ``DiesAfterDoneEvent``'s function
succeeded (done marker set, task not yet acked), ``data["deaths"]`` times.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from cloudevents.core.v1.event import CloudEvent

from workers.pools import function

PREFIX = "vebaq-test:poison"
#: List of the process ids ``HogEvent``'s function ran in, for the test to kill.
HOG_PIDS = f"{PREFIX}:hog-pids"
#: List of the event ids ``GoodEvent`` succeeded for.
GOOD = f"{PREFIX}:good"

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None or _client.connection_pool.pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["VEBAQ_BROKER_URL"])
    return _client


def runs_key(name: str, event_id: str) -> str:
    """Counter of runs of function ``name`` for one event."""
    return f"{PREFIX}:runs:{name}:{event_id}"


def _ran(name: str, event: CloudEvent) -> int:
    return int(_redis().incr(runs_key(name, event.get_id())))


@function(pool="poison", subjects=["SigkillEvent"])
def sigkill(event: CloudEvent) -> None:
    _ran("sigkill", event)
    os.kill(os.getpid(), signal.SIGKILL)


@function(pool="poison", subjects=["ExitEvent"])
def exits(event: CloudEvent) -> None:
    _ran("exits", event)
    os._exit(1)


@function(pool="poison", subjects=["HogEvent"])
def hog(event: CloudEvent) -> None:
    _ran("hog", event)
    ballast = bytearray(64 * 1024 * 1024)  # what the OOM killer would see growing
    _redis().rpush(HOG_PIDS, os.getpid())
    time.sleep(60)
    del ballast


@function(pool="poison", subjects=["TwoStepEvent"])
def step_one(event: CloudEvent) -> None:
    _ran("step_one", event)


@function(pool="poison", subjects=["TwoStepEvent"])
def step_two(event: CloudEvent) -> None:
    _ran("step_two", event)
    os.kill(os.getpid(), signal.SIGKILL)


@function(pool="poison", subjects=["StubbornEvent"])
def stubborn(event: CloudEvent) -> None:
    _ran("stubborn", event)
    try:
        time.sleep(60)
    except SoftTimeLimitExceeded:
        time.sleep(60)  # a function stuck where the soft limit cannot reach it


@function(pool="poison", subjects=["SleepyEvent"])
def sleepy(event: CloudEvent) -> None:
    _ran("sleepy", event)
    time.sleep(float(event.get_data()["seconds"]))


@function(pool="poison", subjects=["DiesAfterDoneEvent"])
def dies_after(event: CloudEvent) -> None:
    _ran("dies_after", event)


@function(pool="poison", subjects=["GoodEvent"])
def good(event: CloudEvent) -> None:
    _redis().rpush(GOOD, event.get_id())


@signals.task_postrun.connect(dispatch_uid="tests.poison.die_after_done")
def _die_after_done(task: Any = None, kwargs: dict | None = None, **_: Any) -> None:
    if getattr(task, "name", None) != "DiesAfterDoneEvent" or not isinstance(kwargs, dict):
        return
    event = kwargs.get("event") or {}
    deaths = int((event.get("data") or {}).get("deaths", 0))
    if int(_redis().incr(f"{PREFIX}:deaths:{event.get('id')}")) <= deaths:
        os._exit(3)
