"""Test-only functions for the ``flaky`` pool (load with ``VEBAQ_FUNCTIONS=tests.flaky_functions``).

Their state is in the broker's Redis (``$VEBAQ_BROKER_URL``), so tests and worker processes see
the same counts. Each function handles one subject:

* ``FlakyEvent``: fails ``data["fail_times"]`` times for an event, then succeeds;
* ``DoomedEvent``: fails until the flag :data:`FIXED` is set;
* ``RejectedEvent``: raises a :class:`~workers.errors.PermanentError` with Knative error
  attributes, like the vROps client's rejections;
* ``GoodEvent``: succeeds.

:func:`structured_event` and :func:`send` publish test events the way the producer does;
:func:`worker_env` is the environment of a worker that runs these functions, and
:func:`queued` reads what waits in a pool's queue.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from cloudevents.core.v1.event import CloudEvent

from vebaq.core.envelope import to_structured
from vebaq.core.messages import queue_for
from workers.errors import PermanentError
from workers.pools import function

#: Prefix of the keys these functions write.
PREFIX = "vebaq-test"
#: Set this key to make ``DoomedEvent`` succeed ("fix the cause").
FIXED = f"{PREFIX}:fixed"
#: ``celery worker`` options for test workers: no waiting for neighbours to answer.
QUICK_START = ("--without-mingle", "--without-gossip")


def calls_key(function_name: str, event_id: str) -> str:
    """Counter of calls of ``function_name`` for one event."""
    return f"{PREFIX}:calls:{function_name}:{event_id}"


def successes_key(function_name: str) -> str:
    """List of event ids ``function_name`` succeeded for, in order."""
    return f"{PREFIX}:ok:{function_name}"


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["VEBAQ_BROKER_URL"])


def _count(r: redis.Redis, name: str, event: CloudEvent) -> int:
    return int(r.incr(calls_key(name, event.get_id())))


class DownstreamDown(Exception):
    """A retryable failure."""


class DownstreamRejected(PermanentError):
    """A permanent failure with the attributes a Knative dead-letter sink would add."""

    def knative_error_attributes(self) -> dict[str, str]:
        return {"knativeerrordest": "https://downstream.example/api", "knativeerrorcode": "422",
                "knativeerrordata": "unprocessable"}


@function(pool="flaky", subjects=["FlakyEvent"])
def flaky(event: CloudEvent) -> None:
    r = _redis()
    calls = _count(r, "flaky", event)
    if calls <= int(event.get_data()["fail_times"]):
        raise DownstreamDown(f"call {calls} failed on purpose")
    r.rpush(successes_key("flaky"), event.get_id())


@function(pool="flaky", subjects=["DoomedEvent"])
def doomed(event: CloudEvent) -> None:
    r = _redis()
    calls = _count(r, "doomed", event)
    if not r.exists(FIXED):
        raise DownstreamDown(f"downstream is down (call {calls})")
    r.rpush(successes_key("doomed"), event.get_id())


@function(pool="flaky", subjects=["RejectedEvent"])
def rejected(event: CloudEvent) -> None:
    _count(_redis(), "rejected", event)
    raise DownstreamRejected("downstream refused the event")


@function(pool="flaky", subjects=["GoodEvent"])
def good(event: CloudEvent) -> None:
    _redis().rpush(successes_key("good"), event.get_id())


def structured_event(subject: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A structured CloudEvent with a fresh id."""
    return to_structured(CloudEvent({
        "id": str(uuid.uuid4()), "source": "https://vcenter.test/sdk",
        "type": "com.vmware.event.router/event", "subject": subject,
        "datacontenttype": "application/json"}, data or {}))


def send(app: Celery, subject: str, data: dict[str, Any] | None = None,
         pool: str = "flaky") -> dict[str, Any]:
    """Publish an event task for ``subject`` to ``pool``; returns the structured event."""
    event = structured_event(subject, data)
    app.send_task(subject, kwargs={"event": event, "pool": pool}, queue=queue_for(pool))
    return event


def worker_env(redis_url: str, config_dir: Path, **policy: Any) -> dict[str, str]:
    """Environment for ``vebaq worker --pool flaky``: these functions, the test database, and
    the ``flaky`` pool's retry ``policy`` (config keys; fast defaults) in a config file."""
    policy = {"retry": 3, "backoffDelay": "0.2s", "maxDelay": "1s", **policy}
    config = config_dir / "vebaq.yaml"
    config.write_text("pools:\n  flaky: {" + ", ".join(f"{k}: {v}" for k, v in policy.items())
                      + "}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    env.update({"VEBAQ_BROKER_URL": redis_url, "VEBAQ_CONFIG": str(config),
                "VEBAQ_FUNCTIONS": "tests.flaky_functions", "PYTHONUNBUFFERED": "1"})
    return env


def queued(r: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The task messages waiting in ``queue`` (kombu's Redis list): headers and kwargs."""
    messages = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages.append({"headers": message["headers"], "kwargs": kwargs})
    return messages
