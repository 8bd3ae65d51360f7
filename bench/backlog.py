"""A 100k-event backlog from the built-in simulated source, drained by the producer pipeline in
a subprocess: events/s and peak RSS, against the source generating (and paging) only.

The simulated source makes its whole backlog up front (``SimulatedReader(backlog=…)`` holds
every event object), so both runs hold it; what the pipeline adds on top — conversion, routing,
publishing, checkpoints — must stay bounded (a page at a time) for the producer to stream.

Run by :func:`measure`; the child is ``python -m bench.backlog --mode pipeline|generate``, which
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import redisdb
from bench.events import SEED
from bench.profiles import Profile
from bench.stats import paired_ratio, summary

#: Seconds one child may run (a 100k drain takes about a minute here).
CHILD_TIMEOUT = 600

ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(mode: str, backlog: int, redis_url: str) -> dict[str, Any]:
    """Drain ``backlog`` simulated events (``pipeline``) or only generate and page them
    (``generate``); both processes import and build the same objects first."""
    from producer.reader import SeenKeys
    from producer.service import ProducerService
    from producer.simulated import SimulatedReader
    from vebaq.core import config
    from workers.pools import load_functions

    settings = config.load(environ={"VEBAQ_BROKER_URL": redis_url},
                           known_pools=load_functions())
    service = ProducerService(settings,
                              simulate={"backlog": backlog, "rate": 0, "seed": SEED})
    rss_before = _status_kib("VmRSS")
    tasks = 0
    started = time.perf_counter()
    if mode == "pipeline":
        if not service.lease.try_acquire():
            raise SystemExit("bench.backlog: another producer holds the simulated lease")
        try:
            service.start()  # makes the SimulatedReader, i.e. the whole backlog
            generated = time.perf_counter()
            while batch := service.reader.poll():
                pending = service._convert(batch)
                if not service._publish(pending):
                    raise SystemExit("bench.backlog: Redis did not take a batch")
                tasks += sum(len(item.messages) for item in pending)
        finally:
            service.lease.release()
    else:
        begin = datetime.now(UTC)
        reader = SimulatedReader(begin=begin, seen=SeenKeys(), backlog=backlog, rate=0,
                                 seed=SEED)
        generated = time.perf_counter()
        while batch := reader.poll():
            reader.confirmed([event.key for event in batch], begin)
    finished = time.perf_counter()
    return {"mode": mode, "events": backlog, "tasks": tasks,
            "generate_seconds": generated - started, "drain_seconds": finished - generated,
            "seconds": finished - started, "rss_before_kib": rss_before,
            "peak_rss_kib": _status_kib("VmHWM")}


def run_child(mode: str, backlog: int, redis_url: str, log_path: Path) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (its peak RSS is its own)."""
    with open(log_path, "ab") as log:
        done = subprocess.run(
            [sys.executable, "-m", "bench.backlog", "--mode", mode, "--backlog", str(backlog),
             "--redis-url", redis_url],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, timeout=CHILD_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.backlog --mode {mode} exited {done.returncode} "
                           f"(see {log_path})")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def measure(profile: Profile, redis_url: str, log_dir: Path) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    runs: dict[str, list[dict[str, Any]]] = {"generate": [], "pipeline": []}
    try:
        for repeat in range(profile.repeats):
            for mode in (("generate", "pipeline") if repeat % 2 == 0
                         else ("pipeline", "generate")):
                redisdb.flush(r)
                runs[mode].append(run_child(mode, profile.backlog, redis_url,
                                            log_dir / "backlog.log"))
    finally:
        redisdb.flush(r)
    rate = {mode: [run["events"] / run["seconds"] for run in done]
            for mode, done in runs.items()}
    peak = {mode: [run["peak_rss_kib"] / 1024 for run in done] for mode, done in runs.items()}
    return {
        "events": profile.backlog,
        "tasks": runs["pipeline"][0]["tasks"],
        "events_per_s": {mode: summary(values) for mode, values in rate.items()},
        "pipeline_drain_events_per_s": summary(
            [run["events"] / run["drain_seconds"] for run in runs["pipeline"]]),
        "ratio_pipeline_to_generate": paired_ratio(rate["pipeline"], rate["generate"]),
        "peak_rss_mib": {mode: summary(values) for mode, values in peak.items()},
        "rss_before_mib": summary([run["rss_before_kib"] / 1024 for run in runs["pipeline"]]),
        "peak_rss_added_by_pipeline_mib": summary(
            [p - g for p, g in zip(peak["pipeline"], peak["generate"], strict=True)]),
        "peak_rss_ratio_pipeline_to_generate": paired_ratio(peak["pipeline"], peak["generate"]),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pipeline", "generate"), required=True)
    parser.add_argument("--backlog", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    redisdb.connect(args.redis_url)  # refuses databases that are not the benchmark's
    print(json.dumps(child(args.mode, args.backlog, args.redis_url)), flush=True)


if __name__ == "__main__":
    main()
