"""What the numbers were measured on: cores, CPU model, Python, Redis and library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import redis

#: Libraries whose versions are recorded with the results.
LIBRARIES = ("celery", "kombu", "redis", "pyvmomi", "cloudevents", "requests")


def cpu_model() -> str:
    """The ``model name`` of the first CPU in ``/proc/cpuinfo`` (or the platform's guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(r: redis.Redis) -> dict[str, Any]:
    """The machine, as recorded in ``bench.json`` and ``RESULTS.md``."""
    server = r.info("server")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": server.get("redis_version"),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
