"""Medians of repeats, percentiles of samples, ratios: the only arithmetic the report uses."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

#: The latency percentiles reported.
PERCENTILES = (50, 95, 99)


def summary(runs: Sequence[float]) -> dict[str, Any]:
    """``median``, ``min``, ``max`` and every run of a repeated measurement."""
    if not runs:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs),
            "runs": list(runs)}


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or ``None`` when either is missing or the baseline is zero."""
    if value is None or not baseline:
        return None
    return value / baseline


def paired_ratio(values: Sequence[float], baselines: Sequence[float]) -> dict[str, Any]:
    """Summary of per-repeat ratios: each repeat's value against the baseline measured next to
    it, which cancels most of a noisy machine's drift."""
    return summary([v / b for v, b in zip(values, baselines, strict=True) if b])


def percentiles(samples: Sequence[float]) -> dict[str, float | None]:
    """``p50``, ``p95``, ``p99`` (inclusive linear interpolation) and ``max``."""
    if len(samples) < 2:
        only = samples[0] if samples else None
        return {**{f"p{p}": only for p in PERCENTILES}, "max": only, "n": len(samples)}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {**{f"p{p}": cuts[p - 1] for p in PERCENTILES}, "max": max(samples),
            "n": len(samples)}
