"""The vrops pool against the fake vROps answering every call after 50 ms: HTTP calls per
maintenance event in steady state, and events/s per worker concurrency model.

One vrops worker per model (``prefork -c 4``, ``threads -c 4``, ``threads -c 8``) runs, paused
while the others are measured. Each is first warmed up (every process has its token and has
looked up every host), then a repeat publishes ``vrops_events`` maintenance events with
:class:`vebaq.core.publish.Publisher` — round-robin over the hosts, each host alternating
between entering and leaving maintenance, keys increasing — and times publish → drained.

Baselines: the walkthrough's handler made 4 calls per event (goal ≤ 2); a model's ideal rate
is its concurrency / 50 ms, one call per event with nothing else costing time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from bench import events, redisdb
from bench.events import VROPS_VCENTER_UUID, MaintenanceEvents
from bench.paused import PausedWorker
from bench.procs import child_env, start_vebaq_worker, stop_all
from bench.profiles import VROPS_LATENCY, WALKTHROUGH_VROPS_CALLS, Profile
from bench.stats import ratio, summary
from tests.support import Proc
from vebaq.core.messages import queue_for
from vebaq.core.publish import Publisher
from vebaq.devtools.fake_vrops import DEFAULT_PASSWORD, DEFAULT_USERNAME, FakeVrops
from workers.app import create_app

#: What the vrops function logs when it skips an event an as-new or newer one superseded.
SKIPPED = r"vrops: .*(stale, skipped|already applied, skipped)"

#: Warm-up events per host and worker process (prefork processes each keep their own cache).
WARM_UP_PER_HOST = 4


def calls(fake: FakeVrops) -> dict[str, int]:
    return dict(fake.snapshot()["calls"])


def run_batch(r: redis.Redis, publisher: Publisher, worker: PausedWorker,
              batch: list[dict[str, Any]]) -> float:
    """Publish ``batch`` and let ``worker`` drain it; seconds from publish to drained."""
    started = time.perf_counter()
    publisher.publish(events.outgoing(batch, "vrops"))
    return worker.drain(r, len(batch), started=started).seconds


def measure(profile: Profile, redis_url: str, log_dir: Path) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    redisdb.flush(r)
    hosts = events.bench_hosts(profile.vrops_hosts)
    maker = MaintenanceEvents(hosts)
    app = create_app(broker_url=redis_url)
    publisher = Publisher(app)
    queue = queue_for("vrops").name
    fake = FakeVrops(hosts=[(name, moref, VROPS_VCENTER_UUID) for name, moref in hosts])
    fake.start()
    fake.configure(latency=VROPS_LATENCY)
    env = child_env(redis_url, VROPS_URL=fake.url, VROPS_USER=DEFAULT_USERNAME,
                    VROPS_PASSWORD=DEFAULT_PASSWORD)
    procs: list[Proc | None] = []
    workers: list[PausedWorker] = []
    rates: dict[str, list[float]] = {}
    per_event: dict[str, list[float]] = {}
    endpoints: dict[str, dict[str, int]] = {}
    try:
        for implementation, concurrency in profile.vrops_models:
            label = f"{implementation} -c {concurrency}"
            node = f"vrops-{implementation}{concurrency}@bench"
            procs.append(start_vebaq_worker("vrops", env, log_dir, concurrency=concurrency,
                                            implementation=implementation, node=node,
                                            name=f"vrops-{implementation}{concurrency}"))
            worker = PausedWorker(label, procs[-1], app, queue, node)
            workers.append(worker)
            processes = concurrency if implementation == "prefork" else 1
            warm = maker.take(len(hosts) * WARM_UP_PER_HOST * processes)
            run_batch(r, publisher, worker, warm)
            rates[label], per_event[label], endpoints[label] = [], [], {}
        for repeat in range(profile.repeats):
            shift = repeat % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                batch = maker.take(profile.vrops_events)
                before = calls(fake)
                seconds = run_batch(r, publisher, worker, batch)
                after = calls(fake)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                rates[worker.label].append(len(batch) / seconds)
                per_event[worker.label].append(sum(delta.values()) / len(batch))
                for endpoint, count in delta.items():
                    endpoints[worker.label][endpoint] = (endpoints[worker.label].get(endpoint, 0)
                                                         + count)
        skipped = {w.label: w.count(SKIPPED) for w in workers}
    finally:
        stop_all(procs)
        fake.stop()
        redisdb.flush(r)
    models = {}
    for implementation, concurrency in profile.vrops_models:
        label = f"{implementation} -c {concurrency}"
        ideal = concurrency / VROPS_LATENCY
        rate = summary(rates[label])
        models[label] = {
            "implementation": implementation, "concurrency": concurrency,
            "events_per_s": rate, "ideal_events_per_s": ideal,
            "ratio_to_ideal": ratio(rate["median"], ideal),
            "calls_per_event": summary(per_event[label]),
            "calls_by_endpoint": endpoints[label],
            "events_skipped_as_stale_or_duplicate": skipped[label],
        }
    all_calls = [c for values in per_event.values() for c in values]
    result: dict[str, Any] = {
        "latency_per_call_s": VROPS_LATENCY, "hosts": len(hosts),
        "events_per_repeat": profile.vrops_events,
        "calls_per_event": summary(all_calls),
        "walkthrough_calls_per_event": WALKTHROUGH_VROPS_CALLS,
        "ratio_to_walkthrough": ratio(summary(all_calls)["median"], WALKTHROUGH_VROPS_CALLS),
        "models": models,
    }
    same = [(m["events_per_s"]["median"], label) for label, m in models.items()
            if m["concurrency"] == 4]
    if len(same) == 2:
        prefork = models["prefork -c 4"]["events_per_s"]["median"]
        threads = models["threads -c 4"]["events_per_s"]["median"]
        result["ratio_threads_to_prefork_c4"] = threads / prefork
    result["fastest"] = max(models, key=lambda label: models[label]["events_per_s"]["median"])
    return result
