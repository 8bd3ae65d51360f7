"""Child processes: vebaq workers and producers, bare Celery workers; logs go to files.

Output goes to a file, never a pipe: the echo pool logs every event, and a pipe nobody reads
would block the worker. Every process gets its own session (process group), so stopping it also
stops its prefork children.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tests.support import Proc, vebaq_argv

#: Seconds a worker or producer may take to start (importing pyvmomi, registering ~450 tasks).
START_TIMEOUT = 90.0

#: Environment variables of the caller that must not leak into a child's configuration.
FOREIGN_PREFIXES = ("VCENTER_", "VROPS_", "VEBAQ_", "vrops")


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The caller's environment without vebaq settings, plus the broker and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
    env.update({"VEBAQ_BROKER_URL": redis_url, "PYTHONUNBUFFERED": "1", **extra})
    return env


def start_vebaq_worker(pool: str, env: dict[str, str], log_dir: Path, *, concurrency: int,
                       implementation: str, name: str, node: str | None = None) -> Proc:
    """``python -m vebaq worker --pool POOL -c N -P IMPL``, once it logged ``ready.``.

    :param node: the Celery node name (``-n``), when several workers of a pool run at once."""
    extra = ("-n", node) if node else ()
    proc = Proc(name, vebaq_argv("worker", "--pool", pool, "-c", str(concurrency),
                                 "-P", implementation, *extra), env, log_dir)
    proc.wait_for(r"ready\.", timeout=START_TIMEOUT)
    return proc


def start_celery_worker(app: str, queue: str, env: dict[str, str], log_dir: Path, *,
                        concurrency: int, implementation: str, name: str) -> Proc:
    """``celery -A APP worker`` with the options ``vebaq worker`` passes, once ready."""
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-n",
            f"{queue}@%h", "--loglevel", "INFO", "-E", "-c", str(concurrency),
            "-P", implementation]
    proc = Proc(name, argv, env, log_dir)
    proc.wait_for(r"ready\.", timeout=START_TIMEOUT)
    return proc


def start_producer(env: dict[str, str], log_dir: Path, name: str,
                   metrics_port: int = 0) -> Proc:
    """``python -m vebaq producer --metrics-port PORT`` (0: none), once it reads vCenter."""
    proc = Proc(name, vebaq_argv("producer", "--metrics-port", str(metrics_port)), env, log_dir)
    proc.wait_for(r"reading vCenter", timeout=START_TIMEOUT)
    return proc


def stop_all(procs: Iterable[Proc | None]) -> None:
    """Stop each process (SIGTERM to its group, SIGKILL after a while); never raises."""
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.stop(timeout=20)
        except Exception as exc:  # a stuck child must not keep the others running
            print(f"bench: could not stop {proc.name}: {exc}", file=sys.stderr)
