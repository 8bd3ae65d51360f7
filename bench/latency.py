"""Latency from a vCenter event's creation to a function starting on it, with the real producer
process reading the vCenter simulator (the test peer), at idle and under load, for each poll
interval, with vCenter's change notifications (the default) and without (polling only); and
what each mode costs vCenter in SOAP calls per minute.

Per run (an interval, notifications on or off): a ``latency`` worker (prefork, 2 processes,
:mod:`bench.latency_functions`) and a producer (``python -m vebaq producer`` with
``VCENTER_POLL_INTERVAL``, ``VCENTER_NOTIFICATIONS``, every other setting default, one trigger
sending every event to the latency pool, and its metrics port) are started; the benchmark then
posts ``GeneralUserEvent``\\ s at a steady rate — 1/s (idle) and 50/s (load) — each tagged with
its phase in its message. The simulator stamps each event's ``createdTime``; the function records
``time.time()`` minus it (same clock). A repeat is one idle and one load phase; after the
repeats, a quiet phase posts nothing for ``quiet_seconds`` (less than the producer's 30 s before
its polls back off).

SOAP calls come from the producer's ``vebaq_producer_vcenter_calls_total{method}``, scraped
before and after each phase: calls per minute, per method, in each phase.

Goals: with notifications, p99 ≤ :data:`NOTIFIED_GOAL` (issue #21: independent of the poll
interval); polling only, p99 ≤ :data:`POLLING_GOAL_FACTOR` × the poll interval; and waiting for
notifications costs vCenter no more calls per minute when quiet than polling every second.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import events, redisdb
from bench.latency_functions import SAMPLES
from bench.procs import child_env, start_producer, start_vebaq_worker, stop_all
from bench.profiles import Profile
from bench.simulator import Client, SimulatorHung, VcSim
from bench.stats import percentiles, summary
from tests.support import Proc, free_port

#: p99 goal with change notifications, in seconds, whatever the poll interval.
NOTIFIED_GOAL = 0.1

#: p99 goal polling only: this many poll intervals.
POLLING_GOAL_FACTOR = 1.2

#: What the producer's SOAP call counter is called on its /metrics.
CALLS_METRIC = "vebaq_producer_vcenter_calls_total"

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


def scrape_calls(port: int) -> dict[str, float]:
    """The producer's SOAP calls so far, by method."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    calls = {}
    for match in re.finditer(rf'^{CALLS_METRIC}{{method="([^"]+)",vcenter="[^"]*"}} (\S+)$',
                             text, re.M):
        calls[match[1]] = calls.get(match[1], 0.0) + float(match[2])
    return calls


def per_minute(before: dict[str, float], after: dict[str, float],
               seconds: float) -> dict[str, float]:
    """Calls per minute by method (and ``total``) between two scrapes ``seconds`` apart."""
    rates = {m: (after.get(m, 0) - before.get(m, 0)) * 60 / seconds for m in after}
    rates = {m: round(v, 1) for m, v in sorted(rates.items()) if v}
    rates["total"] = round(sum(rates.values()), 1)
    return rates


def run_interval(profile: Profile, redis_url: str, sim_url: str, interval: float,
                 log_dir: Path, notifications: bool = True,
                 backoff: bool = True) -> dict[str, Any]:
    """Start a worker and a producer polling every ``interval`` s; run the repeats and the
    quiet phase.

    :param notifications: wait on vCenter's change notifications between polls (the default).
    :param backoff: keep the default ``maxPollInterval`` (idle polls back off up to it);
        false sets it to ``interval``."""
    r = redisdb.connect(redis_url)
    redisdb.flush(r)
    name = (f"{interval}{'' if notifications else '-polling'}"
            f"{'' if backoff else '-no-backoff'}")
    config = log_dir / f"latency-{name}.yaml"
    config.write_text(CONFIG if backoff else
                      f"{CONFIG}vcenter:\n  maxPollInterval: {interval}\n", encoding="utf-8")
    port = free_port()
    env = child_env(redis_url, VCENTER_URL=sim_url, VCENTER_USER="vebaq-bench",
                    VCENTER_PASSWORD="bench-password", VCENTER_POLL_INTERVAL=str(interval),
                    VCENTER_NOTIFICATIONS=str(notifications).lower(),
                    VEBAQ_CONFIG=str(config), VEBAQ_FUNCTIONS="bench.latency_functions")
    procs: list[Proc | None] = []
    poster = Poster(sim_url)
    phases: dict[str, list[dict[str, Any]]] = {"idle": [], "load": []}
    calls: dict[str, list[dict[str, float]]] = {"idle": [], "load": [], "quiet": []}
    lost = 0
    try:
        procs.append(start_vebaq_worker("latency", env, log_dir,
                                        concurrency=WORKER_CONCURRENCY, implementation="prefork",
                                        name=f"latency-worker-{name}"))
        procs.append(start_producer(env, log_dir, name=f"latency-producer-{name}",
                                    metrics_port=port))
        producer = procs[-1]
        warm = poster.post(f"{name}/warm-up", 2.0, 2.0)  # connections, first tasks
        collect(r, f"{name}/warm-up", warm, SETTLE_TIMEOUT)
        for repeat in range(profile.repeats):
            for phase, rate, seconds in (("idle", profile.idle_rate, profile.idle_seconds),
                                         ("load", profile.load_rate, profile.load_seconds)):
                tag = f"{name}/{phase}/{repeat}"
                before, started = scrape_calls(port), time.monotonic()
                posted = poster.post(tag, rate, seconds)
                calls[phase].append(per_minute(before, scrape_calls(port),
                                               time.monotonic() - started))
                samples = collect(r, tag, posted, SETTLE_TIMEOUT + interval * 10)
                if len(samples) < posted:
                    poster.client.check()  # a hung simulator means: start this run over
                lost += posted - len(samples)
                phases[phase].append({"posted": posted, "samples": samples,
                                      **percentiles(samples)})
        before, started = scrape_calls(port), time.monotonic()
        time.sleep(profile.quiet_seconds)
        calls["quiet"].append(per_minute(before, scrape_calls(port), time.monotonic() - started))
        rereads = len(re.findall(r"collector stalled", producer.log()))
        gave_up = "does not notify changes" in producer.log()
    finally:
        poster.close()
        stop_all(reversed(procs))
        redisdb.flush(r)
    goal = NOTIFIED_GOAL if notifications else POLLING_GOAL_FACTOR * interval
    result: dict[str, Any] = {"poll_interval": interval, "notifications": notifications,
                              "notifications_gave_up": gave_up, "goal_p99": goal,
                              "max_poll_interval": None if backoff else interval,
                              "events_lost": lost, "collector_resets": rereads,
                              "calls_per_minute": {
                                  phase: {"total": summary([c["total"] for c in runs]),
                                          "by_method": runs}
                                  for phase, runs in calls.items()}}
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
            and medians["p99"]["median"] <= goal,
            "samples": sorted(round(s, 4) for s in pooled),
        }
    return result


def measure(profile: Profile, redis_url: str, sim: VcSim, log_dir: Path) -> dict[str, Any]:
    """Every interval with notifications and polling only (and the no-back-off ones); a run
    that hung the simulator is started over once on a fresh one (see :mod:`bench.simulator`)."""
    plan = [(f"{i}{'' if notified else '-polling'}", i, notified, True)
            for i in profile.latency_intervals for notified in (True, False)]
    plan += [(f"{i}-polling-no-backoff", i, False, False)
             for i in profile.latency_without_backoff]
    runs: dict[str, Any] = {}
    hangs: list[dict[str, str]] = []
    for key, interval, notified, backoff in plan:
        for _ in range(ATTEMPTS):
            try:
                runs[key] = run_interval(profile, redis_url, sim.url, interval, log_dir,
                                         notifications=notified, backoff=backoff)
                break
            except SimulatorHung as exc:
                hangs.append({"run": key, "error": str(exc)})
                sim.restart()
        else:
            raise RuntimeError(f"latency {key}: the simulator hung {ATTEMPTS} times")
    return {"worker_concurrency": WORKER_CONCURRENCY, "by_interval": runs,
            "simulator_hangs": hangs, **quiet_calls_comparison(runs)}


def quiet_calls_comparison(runs: dict[str, Any]) -> dict[str, Any]:
    """SOAP calls per minute when quiet: each notification run against polling every second."""
    polling = runs.get("1.0-polling")
    if polling is None:
        return {}
    baseline = polling["calls_per_minute"]["quiet"]["total"]["median"]
    return {"quiet_calls_per_minute_polling_1s": baseline,
            "quiet_calls_ratio_to_polling_1s": {
                key: run["calls_per_minute"]["quiet"]["total"]["median"] / baseline
                for key, run in runs.items() if run["notifications"] and baseline}}
