"""``bench.png``: one panel per goal — producer drain, publishing, worker throughput, latency
(with and without change notifications), memory of a backlog, vCenter calls per minute — and
the vROps pool (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

#: Size (inches) and resolution: small enough to commit.
FIGSIZE = (17.0, 7.6)
DPI = 72


def _median(summary: dict[str, Any] | None) -> float:
    return (summary or {}).get("median") or 0.0


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str]) -> None:
    positions = range(len(labels))
    ax.bar(positions, values, color=colors)
    ax.set_xticks(list(positions), labels, fontsize=8)
    for x, value in zip(positions, values, strict=True):
        ax.annotate(f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=8)


def _drain(ax: Any, results: dict[str, Any]) -> None:
    drain = results["sections"]["drain"]
    rates = drain["events_per_s"]
    pyvmomi = _median(rates["pyvmomi"])
    _bars(ax, ["pyvmomi\nread only", "EventReader\nalone", "producer\npipeline"],
          [pyvmomi, _median(rates["reader"]), _median(rates["pipeline"])],
          ["tab:gray", "tab:blue", "tab:green"])
    ax.axhline(0.9 * pyvmomi, color="black", linestyle=":", linewidth=1)
    ratio = _median(drain["ratio_pipeline_to_pyvmomi"])
    ax.set_title(f"producer drain, {drain['events']['pipeline']:,} events: "
                 f"{ratio:.2f} × read-only (goal 0.9, dotted)", fontsize=9)
    ax.set_ylabel("events/s (median)")


def _publish(ax: Any, results: dict[str, Any]) -> None:
    raw = results["sections"]["raw"]
    push = _median(raw["push_per_s"])
    _bars(ax, ["raw pipelined\nLPUSH", "Publisher.publish\n(task-sent on)"],
          [push, _median(raw["publish_per_s"])], ["tab:gray", "tab:green"])
    ax.axhline(0.15 * push, color="black", linestyle=":", linewidth=1)
    ax.set_title(f"publishing {raw['messages']:,} tasks: "
                 f"{_median(raw['ratio_publish_to_push']):.2f} × raw (goal 0.15, dotted)",
                 fontsize=9)
    ax.set_ylabel("messages/s (median)")


def _throughput(ax: Any, results: dict[str, Any]) -> None:
    cases = results["sections"]["throughput"].get("by_concurrency") or {}
    processes = [int(c) for c in cases]
    for kind, marker in (("echo", "o"), ("bare", "s")):
        medians = [cases[str(c)][f"{kind}_tasks_per_s"]["median"] for c in processes]
        lows = [m - cases[str(c)][f"{kind}_tasks_per_s"]["min"]
                for m, c in zip(medians, processes, strict=True)]
        highs = [cases[str(c)][f"{kind}_tasks_per_s"]["max"] - m
                 for m, c in zip(medians, processes, strict=True)]
        ax.errorbar(processes, medians, yerr=[lows, highs], marker=marker, capsize=3,
                    label="echo pool" if kind == "echo" else "bare no-op task")
    ratios = ", ".join(f"-c {c}: {_median(cases[str(c)]['ratio_echo_to_bare']):.2f}"
                       for c in processes)
    ax.set_title(f"worker (prefork), echo/bare {ratios} (goal 0.9)", fontsize=9)
    ax.set_xlabel("worker processes (-c)")
    ax.set_ylabel("tasks/s (median, min–max)")
    ax.set_xticks(processes or [1, 2])
    ax.set_ylim(bottom=0)
    if processes:
        ax.legend(fontsize=8, loc="lower right")


def _latency(ax: Any, results: dict[str, Any]) -> None:
    latency = results["sections"]["latency"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = list((latency.get("by_interval") or {}).items())
    for i, (_key, run) in enumerate(runs):
        color = colors[i % len(colors)]
        mode = "notifications" if run.get("notifications") else "polling"
        label = f"poll {run['poll_interval']:g} s, {mode}"
        for phase, style in (("idle", "--"), ("load", "-")):
            samples = [s for s in run[phase]["samples"] if s > 0]
            if samples:
                fraction = [(j + 1) / len(samples) for j in range(len(samples))]
                ax.step(samples, fraction, style, where="post", color=color,
                        label=f"{label}, {phase}")
        ax.axvline(run["goal_p99"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_title("event created → function started (dotted: p99 goals)", fontsize=9)
    ax.set_xlabel("seconds (log)")
    ax.set_ylabel("fraction of events")
    ax.set_ylim(0, 1.02)
    if runs:
        ax.legend(fontsize=6, loc="upper left")


def _calls(ax: Any, results: dict[str, Any]) -> None:
    runs = list((results["sections"]["latency"].get("by_interval") or {}).values())
    phases = ("quiet", "idle", "load")
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        mode = "notifications" if run.get("notifications") else "polling"
        values = [_median(run["calls_per_minute"][p]["total"]) for p in phases]
        ax.bar([x + i * width for x in range(len(phases))], values, width,
               label=f"poll {run['poll_interval']:g} s, {mode}")
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(phases))],
                  ["quiet", "idle 1/s", "load 50/s"])
    ax.set_yscale("log")
    ax.set_title("vCenter SOAP calls per minute", fontsize=9)
    ax.set_ylabel("calls/min (log)")
    if runs:
        ax.legend(fontsize=7, loc="upper left")


def _memory(ax: Any, results: dict[str, Any]) -> None:
    backlog = results["sections"]["backlog"]
    peak = backlog["peak_rss_mib"]
    generate = _median(peak["generate"])
    _bars(ax, ["generate\nonly", "producer\npipeline"], [generate, _median(peak["pipeline"])],
          ["tab:gray", "tab:green"])
    ax.axhline(generate + 50, color="black", linestyle=":", linewidth=1)
    ax.set_title(f"backlog of {backlog['events']:,}: peak RSS "
                 f"+{_median(backlog['peak_rss_added_by_pipeline_mib']):.1f} MiB "
                 "(limit +50, dotted)", fontsize=9)
    ax.set_ylabel("peak RSS, MiB (median)")


def _vrops(ax: Any, results: dict[str, Any]) -> None:
    models = results["sections"]["vrops"].get("models") or {}
    labels = list(models)
    medians = [models[m]["events_per_s"]["median"] for m in labels]
    ideals = [models[m]["ideal_events_per_s"] for m in labels]
    positions = range(len(labels))
    ax.bar(positions, medians, color="tab:green", label="measured")
    ax.scatter(positions, ideals, marker="_", s=600, color="black",
               label="ideal (c / 50 ms)", zorder=3)
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_title("vrops pool, fake vROps 50 ms/call", fontsize=9)
    ax.set_ylabel("maintenance events/s (median)")
    if labels:
        ax.set_ylim(0, max(ideals) * 1.35)
        ax.legend(fontsize=8, loc="upper left")


def _goals(ax: Any, results: dict[str, Any]) -> None:
    from bench.report import rows

    lines = [f"{row.goal[-1] if row.goal.endswith(('✓', '✗')) else ' '} "
             f"{row.measurement.strip()[:58]}: {row.ratio or row.value}"
             for row in rows(results) if row.goal]
    ax.set_axis_off()
    ax.set_title("goals (✓ met, ✗ not)", fontsize=9)
    ax.text(0, 1, "\n".join(lines) or "none measured", va="top", ha="left", fontsize=6.5,
            family="monospace", transform=ax.transAxes)


#: Panel, the sections it needs, in reading order.
PANELS: tuple[tuple[Callable[[Any, dict[str, Any]], None], tuple[str, ...]], ...] = (
    (_drain, ("drain",)), (_publish, ("raw",)), (_throughput, ("throughput",)),
    (_memory, ("backlog",)), (_latency, ("latency",)), (_calls, ("latency",)),
    (_vrops, ("vrops",)), (_goals, ()),
)


def draw(results: dict[str, Any], path: Path) -> None:
    """Write the figure for ``results`` to ``path``; panels whose sections did not run (or
    failed) say so."""
    sections = results["sections"]
    figure, axes = plt.subplots(2, 4, figsize=FIGSIZE)
    cells = list(axes.flat)
    for (draw_panel, needs), ax in zip(PANELS, cells, strict=False):
        missing = [n for n in needs if not sections.get(n) or "error" in sections[n]]
        if missing:
            ax.set_title(f"{', '.join(missing)}: not measured", fontsize=9)
            ax.set_axis_off()
            continue
        try:
            draw_panel(ax, results)
        except (KeyError, TypeError, ValueError) as exc:  # an older bench.json, a partial run
            ax.clear()
            ax.set_title(f"{needs[0]}: cannot draw ({type(exc).__name__}: {exc})", fontsize=8)
            ax.set_axis_off()
    for ax in cells[len(PANELS):]:
        ax.set_axis_off()
    machine = results["machine"]
    figure.suptitle(f"vebaq bench ({results['profile']}) — {machine['nproc']} × "
                    f"{machine['cpu_model']}, Python {machine['python']}, Redis "
                    f"{machine['redis_server']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
