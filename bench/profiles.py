"""How big each measurement is: the full run (about 10 minutes) and ``--quick`` (about 2)."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: The Redis database the benchmark owns; it is flushed before every measurement. Only ever
#: database 13: other databases of the shared server belong to others (tests use 9).
REDIS_URL = os.environ.get("VEBAQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")

#: The walkthrough's vROps handler made this many HTTP calls per maintenance event.
WALKTHROUGH_VROPS_CALLS = 4

#: Seconds the fake vROps waits before answering each call.
VROPS_LATENCY = 0.05


@dataclass(frozen=True)
class Profile:
    """Sizes of one run; every figure is the median of :attr:`repeats` runs.

    :param drain_events: events waiting in the simulator for the producer drain (the test peer
        keeps 100,000 and pages forward, as vCenter does).
    :param backlog: events of the simulated backlog drained in a subprocess.
    :param worker_tasks: messages preloaded per worker-throughput run.
    :param raw_messages: messages pushed and popped per raw-Redis run.
    :param latency_intervals: producer poll intervals (seconds) the latency is measured at.
    :param latency_without_backoff: intervals measured once more with ``maxPollInterval`` equal
        to the poll interval (no idle back-off), to tell the back-off's share of the latency.
    :param idle_seconds: seconds of posting at :attr:`idle_rate` per latency repeat.
    :param quiet_seconds: seconds of posting nothing after a latency run's repeats (vCenter
        calls per minute when quiet; under the producer's 30 s before it backs off).
    :param load_seconds: seconds of posting at :attr:`load_rate` per latency repeat.
    :param vrops_events: maintenance events per vROps repeat.
    :param vrops_models: ``(pool implementation, concurrency)`` pairs of the vrops worker.
    :param archive_events: events archived and replayed per archive repeat.
    :param http_events: events per run of the HTTP section (direct, ingress, ingress batches).
    :param http_senders: threads posting at once in the HTTP section.
    """

    name: str
    repeats: int
    drain_events: int
    backlog: int
    worker_tasks: int
    raw_messages: int
    latency_intervals: tuple[float, ...]
    latency_without_backoff: tuple[float, ...]
    idle_seconds: float
    load_seconds: float
    quiet_seconds: float
    vrops_events: int
    vrops_models: tuple[tuple[str, int], ...]
    archive_events: int = 20_000
    idle_rate: float = 1.0
    load_rate: float = 50.0
    worker_concurrency: tuple[int, ...] = (1, 2)
    http_events: int = 1000
    http_senders: int = 8
    #: Hosts the vROps events are spread over (consecutive events of a host are this far apart
    #: in the queue, so parallel tasks never reorder one host's events).
    vrops_hosts: int = 16


FULL = Profile(
    name="full", repeats=3, drain_events=5_000, backlog=100_000, worker_tasks=1500,
    raw_messages=20_000,
    latency_intervals=(0.5, 1.0), latency_without_backoff=(), idle_seconds=12.0,
    load_seconds=5.0, quiet_seconds=20.0, vrops_events=300,
    vrops_models=(("prefork", 4), ("threads", 4), ("threads", 8)), http_events=2000,
)

QUICK = Profile(
    name="quick", repeats=3, drain_events=1_001, backlog=5_000, worker_tasks=250,
    raw_messages=5_000,
    latency_intervals=(1.0,), latency_without_backoff=(), idle_seconds=4.0, load_seconds=2.0,
    quiet_seconds=10.0, vrops_events=60,
    vrops_models=(("prefork", 4), ("threads", 4)), archive_events=3_000, http_events=300,
)
