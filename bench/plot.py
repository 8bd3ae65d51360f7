"""``bench.png``: latency distributions, worker throughput vs processes, vROps events/s per
concurrency model (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

#: Size (inches) and resolution: small enough to commit.
FIGSIZE = (13.0, 3.8)
DPI = 80


def _latency(ax: Any, latency: dict[str, Any]) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = list((latency.get("by_interval") or {}).items())
    for i, (key, run) in enumerate(runs):
        color = colors[i % len(colors)]
        label = f"poll {key.replace('-no-backoff', ' s, no back-off')}"
        if not label.endswith("back-off"):
            label += " s"
        for phase, style in (("idle", "--"), ("load", "-")):
            samples = run[phase]["samples"]
            if samples:
                fraction = [(j + 1) / len(samples) for j in range(len(samples))]
                ax.step(samples, fraction, style, where="post", color=color,
                        label=f"{label}, {phase}")
        ax.axvline(run["goal_p99"], color=color, linestyle=":", linewidth=1)
    ax.set_title("event created → function started")
    ax.set_xlabel("seconds (dotted: goal, poll interval + 0.1 s)")
    ax.set_ylabel("fraction of events")
    ax.set_ylim(0, 1.02)
    if runs:
        ax.legend(fontsize=7, loc="lower right")


def _throughput(ax: Any, throughput: dict[str, Any]) -> None:
    cases = throughput.get("by_concurrency") or {}
    processes = [int(c) for c in cases]
    for kind, marker in (("echo", "o"), ("bare", "s")):
        medians = [cases[str(c)][f"{kind}_tasks_per_s"]["median"] for c in processes]
        lows = [m - cases[str(c)][f"{kind}_tasks_per_s"]["min"]
                for m, c in zip(medians, processes, strict=True)]
        highs = [cases[str(c)][f"{kind}_tasks_per_s"]["max"] - m
                 for m, c in zip(medians, processes, strict=True)]
        ax.errorbar(processes, medians, yerr=[lows, highs], marker=marker, capsize=3,
                    label="echo pool" if kind == "echo" else "bare no-op task")
    ax.set_title("worker throughput (prefork)")
    ax.set_xlabel("worker processes (-c)")
    ax.set_ylabel("tasks/s (median, min–max)")
    ax.set_xticks(processes or [1, 2])
    ax.set_ylim(bottom=0)
    if processes:
        ax.legend(fontsize=8, loc="lower right")


def _vrops(ax: Any, vrops: dict[str, Any]) -> None:
    models = vrops.get("models") or {}
    labels = list(models)
    medians = [models[m]["events_per_s"]["median"] for m in labels]
    ideals = [models[m]["ideal_events_per_s"] for m in labels]
    positions = range(len(labels))
    ax.bar(positions, medians, color="tab:green", label="measured")
    ax.scatter(positions, ideals, marker="_", s=600, color="black",
               label="ideal (c / 50 ms)", zorder=3)
    ax.set_xticks(list(positions), labels)
    ax.set_title("vrops pool, fake vROps 50 ms/call")
    ax.set_ylabel("maintenance events/s (median)")
    if labels:
        ax.set_ylim(0, max(ideals) * 1.35)
        ax.legend(fontsize=8, loc="upper left")


def draw(results: dict[str, Any], path: Path) -> None:
    """Write the figure for ``results`` to ``path``; sections that did not run stay empty."""
    sections = results["sections"]
    figure, axes = plt.subplots(1, 3, figsize=FIGSIZE, gridspec_kw={"width_ratios": [5, 3, 3]})
    for draw_panel, name, ax in ((_latency, "latency", axes[0]),
                                 (_throughput, "throughput", axes[1]),
                                 (_vrops, "vrops", axes[2])):
        section = sections.get(name) or {}
        if "error" in section or not section:
            ax.set_title(f"{name}: not measured")
            ax.set_axis_off()
            continue
        draw_panel(ax, section)
    machine = results["machine"]
    figure.suptitle(f"vebaq bench ({results['profile']}) — {machine['nproc']} × "
                    f"{machine['cpu_model']}, Python {machine['python']}, Redis "
                    f"{machine['redis_server']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
