"""``python -m bench``: run the measurements, write ``bench.json``, ``bench.png`` and
``RESULTS.md``, print the table.

Each section runs in turn on the same machine and Redis database (flushed before each
measurement); a section that fails is recorded with its error and the others still run (the
exit status is then 1). Child processes are stopped in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import machine, redisdb
from bench.profiles import FULL, QUICK, REDIS_URL, Profile

if TYPE_CHECKING:
    from bench.simulator import VcSim

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"

#: The sections, in the order they run.
SECTIONS = ("raw", "drain", "backlog", "throughput", "latency", "vrops", "archive", "http",
            "scrub", "routing", "fetch")

#: Sections that need govmomi's vCenter simulator.
NEED_SIMULATOR = frozenset({"drain", "latency"})


def _code_state() -> dict[str, Any]:
    """The commit measured and the files changed since (read-only git commands)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain").splitlines()
                if line[:2].strip() and not line[3:].startswith("bench/")]
    diff = git("diff", "HEAD", "--", ".", ":(exclude)bench")
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "modified_files": modified,
            "diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def _section_runner(name: str, profile: Profile, redis_url: str, sim: VcSim | None,
                    log_dir: Path) -> Callable[[], dict[str, Any]]:
    if name == "raw":
        from bench import raw
        return lambda: raw.measure(profile, redis_url)
    if name == "drain":
        from bench import drain
        return lambda: drain.measure(profile, redis_url, sim.url)
    if name == "backlog":
        from bench import backlog
        return lambda: backlog.measure(profile, redis_url, log_dir)
    if name == "throughput":
        from bench import throughput
        return lambda: throughput.measure(profile, redis_url, log_dir)
    if name == "latency":
        from bench import latency
        return lambda: latency.measure(profile, redis_url, sim, log_dir)
    if name == "archive":
        from bench import archive
        return lambda: archive.measure(profile, redis_url)
    if name == "http":
        from bench import http_events
        return lambda: http_events.measure(profile, redis_url, log_dir)
    if name == "routing":
        from bench import routing
        return lambda: routing.measure(profile, redis_url)
    if name == "fetch":
        from bench import fetch
        return lambda: fetch.measure(profile, redis_url)
    if name == "scrub":
        from bench import scrub
        return lambda: scrub.measure(profile)
    from bench import vrops
    return lambda: vrops.measure(profile, redis_url, log_dir)


def run(profile: Profile, sections: list[str], out: Path, redis_url: str) -> dict[str, Any]:
    """Run ``sections``; returns the results document."""
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.iterdir():  # child logs are appended to: start each run afresh
        if old.is_file():
            old.unlink()
    r = redisdb.connect(redis_url)
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "profile": profile.name, "repeats": profile.repeats, "sizes": asdict(profile),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(r), "code": _code_state(), "sections": {},
    }
    simulator = None
    try:
        if NEED_SIMULATOR & set(sections):
            from bench.simulator import VcSim

            simulator = VcSim(log_dir)
        for name in sections:
            began = time.monotonic()
            print(f"bench: {name} …", file=sys.stderr, flush=True)
            try:
                results["sections"][name] = _section_runner(name, profile, redis_url,
                                                            simulator, log_dir)()
            except Exception as exc:  # recorded; the other sections still run
                (log_dir / f"{name}.error.txt").write_text(traceback.format_exc())
                results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            results["sections"][name]["seconds"] = round(time.monotonic() - began, 1)
            print(f"bench: {name} done in {time.monotonic() - began:.0f}s", file=sys.stderr,
                  flush=True)
    finally:
        if simulator is not None:
            simulator.stop()
        redisdb.flush(r)
    results["seconds"] = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "vebaq benchmarks: each figure next to a baseline measured in the same run."))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a smoke run of every section (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory for bench.json, bench.png, RESULTS.md and logs "
                             "(default: bench/results)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of "
                             f"{','.join(SECTIONS)})")
    parser.add_argument("--publish", action="store_true",
                        help="also write bench/RESULTS.md and bench/results.png (committed)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r} (expected {', '.join(SECTIONS)})")
    profile = QUICK if args.quick else FULL
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    results = run(profile, sections, out, REDIS_URL)

    from bench import plot, report

    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot.draw(results, out / "bench.png")
    (out / "RESULTS.md").write_text(report.markdown(results, "bench.png"), encoding="utf-8")
    if args.publish:
        report.publish(results, BENCH_DIR / "RESULTS.md")
        shutil.copyfile(out / "bench.png", BENCH_DIR / "results.png")
    print(report.text_table(report.rows(results)))
    print(f"\n{out / 'bench.json'}, {out / 'bench.png'}, {out / 'RESULTS.md'} "
          f"({results['seconds']:.0f}s)")
    failed = [name for name, section in results["sections"].items() if "error" in section]
    if failed:
        print(f"bench: failed: {', '.join(failed)} (see {out / 'logs'})", file=sys.stderr)
        return 1
    return 0
