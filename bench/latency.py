"""Latency from a vCenter event's creation to a function starting on it, with the real producer
process polling govmomi's simulator, at idle and under load, for each poll interval.

Per poll interval: a ``latency`` worker (prefork, 2 processes, :mod:`bench.latency_functions`)
and a producer (``python -m vebaq producer`` with ``VCENTER_POLL_INTERVAL``, the ``latestPage``
fallback the simulator needs, every other setting default, and one trigger sending every event
to the latency pool) are started; the benchmark then posts ``GeneralUserEvent``s at a steady
rate — 1/s (idle) and 50/s (load) — each tagged with its phase in its message. The simulator
stamps each event's ``createdTime``; the function records ``time.time()`` minus it (same
clock). A repeat is one idle and one load phase.

Goal: p99 ≤ poll interval + 100 ms. The producer's default ``maxPollInterval`` (5 s) lets idle
polls back off; intervals in ``latency_without_backoff`` are measured again with it set to the
poll interval, which shows how much of the latency the back-off causes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from bench import events, redisdb
from bench.latency_functions import SAMPLES
from bench.procs import child_env, start_producer, start_vebaq_worker, stop_all
from bench.profiles import Profile
from bench.simulator import Client, SimulatorHung, VcSim
from bench.stats import percentiles, summary
from tests.support import Proc

#: The goal's allowance on top of the poll interval, in seconds.
GOAL_MARGIN = 0.1

#: Latency workers (prefork processes): the default, one per core.
WORKER_CONCURRENCY = 2

#: Seconds to wait for the last samples of a phase after its last post.
SETTLE_TIMEOUT = 30.0

#: Runs of one interval before giving up on a simulator that keeps hanging.
ATTEMPTS = 2

CONFIG = "triggers:\n  - name: latency\n    pool: latency\n"


class Poster:
    """Posts tagged events to the simulator at a steady rate, on its own connection."""

    def __init__(self, sim_url: str) -> None:
        self.client = Client(sim_url)

    def post(self, tag: str, rate: float, seconds: float) -> int:
        """Post ``rate`` events per second for ``seconds``; returns how many were posted.

        Posts follow a fixed schedule (not "sleep after each post"), so a slow post does not
        lower the rate."""
        count = max(1, round(rate * seconds))
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.client.post(events.general_event(f"bench {tag} {i}"))
        return count

    def close(self) -> None:
        self.client.close()


def collect(r: Any, tag: str, expected: int, timeout: float) -> list[float]:
    """The latencies recorded for ``tag``, once all ``expected`` arrived (or the timeout)."""
    prefix = f"bench {tag} "
    deadline = time.monotonic() + timeout
    while True:
        samples = {}
        for raw in r.lrange(SAMPLES, 0, -1):
            sample = json.loads(raw)
            if (sample.get("message") or "").startswith(prefix):
                samples[sample["id"]] = sample["latency"]
        if len(samples) >= expected or time.monotonic() > deadline:
            return list(samples.values())
        time.sleep(0.2)


def run_interval(profile: Profile, redis_url: str, sim_url: str, interval: float,
                 log_dir: Path, backoff: bool = True) -> dict[str, Any]:
    """Start a worker and a producer polling every ``interval`` s; run the repeats.

    :param backoff: keep the default ``maxPollInterval`` (idle polls back off up to it);
        false sets it to ``interval``."""
    r = redisdb.connect(redis_url)
    redisdb.flush(r)
    name = f"{interval}" if backoff else f"{interval}-no-backoff"
    config = log_dir / f"latency-{name}.yaml"
    config.write_text(CONFIG if backoff else
                      f"{CONFIG}vcenter:\n  maxPollInterval: {interval}\n", encoding="utf-8")
    env = child_env(redis_url, VCENTER_URL=sim_url, VCENTER_USER="vebaq-bench",
                    VCENTER_PASSWORD="bench-password", VCENTER_POLL_INTERVAL=str(interval),
                    VEBAQ_CONFIG=str(config), VEBAQ_FUNCTIONS="bench.latency_functions")
    procs: list[Proc | None] = []
    poster = Poster(sim_url)
    phases: dict[str, list[dict[str, Any]]] = {"idle": [], "load": []}
    lost = 0
    try:
        procs.append(start_vebaq_worker("latency", env, log_dir,
                                        concurrency=WORKER_CONCURRENCY, implementation="prefork",
                                        name=f"latency-worker-{name}"))
        procs.append(start_producer(env, log_dir, name=f"latency-producer-{name}"))
        producer = procs[-1]
        warm = poster.post(f"{interval}/warm-up", 2.0, 2.0)  # connections, first tasks
        collect(r, f"{interval}/warm-up", warm, SETTLE_TIMEOUT)
        for repeat in range(profile.repeats):
            for phase, rate, seconds in (("idle", profile.idle_rate, profile.idle_seconds),
                                         ("load", profile.load_rate, profile.load_seconds)):
                tag = f"{interval}/{phase}/{repeat}"
                posted = poster.post(tag, rate, seconds)
                samples = collect(r, tag, posted, SETTLE_TIMEOUT + interval * 10)
                if len(samples) < posted:
                    poster.client.check()  # a hung simulator means: start this run over
                lost += posted - len(samples)
                phases[phase].append({"posted": posted, "samples": samples,
                                      **percentiles(samples)})
        rereads = len(re.findall(r"re-reading", producer.log()))
    finally:
        poster.close()
        stop_all(reversed(procs))
        redisdb.flush(r)
    result: dict[str, Any] = {"poll_interval": interval, "goal_p99": interval + GOAL_MARGIN,
                              "max_poll_interval": None if backoff else interval,
                              "events_lost": lost, "producer_window_rereads": rereads}
    for phase, runs in phases.items():
        pooled = [s for run in runs for s in run["samples"]]
        medians = {f"p{p}": summary([run[f"p{p}"] for run in runs if run[f"p{p}"] is not None])
                   for p in (50, 95, 99)}
        result[phase] = {
            "rate": profile.idle_rate if phase == "idle" else profile.load_rate,
            "events": sum(run["posted"] for run in runs),
            "per_repeat": medians,
            "pooled": percentiles(pooled),
            "p99_over_interval": summary([run["p99"] / interval for run in runs
                                          if run["p99"] is not None]),
            "goal_met": medians["p99"]["median"] is not None
            and medians["p99"]["median"] <= interval + GOAL_MARGIN,
            "samples": sorted(round(s, 4) for s in pooled),
        }
    return result


def measure(profile: Profile, redis_url: str, sim: VcSim, log_dir: Path) -> dict[str, Any]:
    """Every interval (and the no-back-off ones); a run that hung the simulator is started
    over once on a fresh one (see :mod:`bench.simulator`)."""
    plan = [(str(i), i, True) for i in profile.latency_intervals]
    plan += [(f"{i}-no-backoff", i, False) for i in profile.latency_without_backoff]
    runs: dict[str, Any] = {}
    hangs: list[dict[str, str]] = []
    for key, interval, backoff in plan:
        for _ in range(ATTEMPTS):
            try:
                runs[key] = run_interval(profile, redis_url, sim.url, interval, log_dir,
                                         backoff=backoff)
                break
            except SimulatorHung as exc:
                hangs.append({"run": key, "error": str(exc)})
                sim.restart()
        else:
            raise RuntimeError(f"latency {key}: the simulator hung {ATTEMPTS} times")
    return {"worker_concurrency": WORKER_CONCURRENCY, "by_interval": runs,
            "simulator_hangs": hangs}
