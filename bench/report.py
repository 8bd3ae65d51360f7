"""The results as a table (terminal and Markdown) and as ``RESULTS.md``.

Every row shows a figure, the baseline measured next to it, their ratio and the goal; the
numbers are medians of the repeats (``bench.json`` has every run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import ratio

#: The hand-written part of ``bench/RESULTS.md`` that republishing keeps.
NOTES_HEADING = "## Notes"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    section: str
    measurement: str
    value: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _met(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def _median(summary: dict[str, Any] | None) -> float | None:
    return None if not summary else summary.get("median")


def rows(results: dict[str, Any]) -> list[Row]:
    """The table rows of every section that ran (a failed section shows its error)."""
    out: list[Row] = []
    sections = results["sections"]
    raw = sections.get("raw") or {}
    push, pop = _median(raw.get("push_per_s")), _median(raw.get("pop_per_s"))

    for name, section in sections.items():
        if "error" in section:
            out.append(Row(name, "FAILED", section["error"][:80]))

    drain = sections.get("drain") or {}
    if "events_per_s" in drain:
        rates = drain["events_per_s"]
        r = _median(drain["ratio_pipeline_to_pyvmomi"])
        out += [
            Row("producer", f"drain vcsim → Redis, {drain['events']['pipeline']} events "
                "(events/s)", _num(_median(rates["pipeline"])),
                f"pyvmomi read only {_num(_median(rates['pyvmomi']))}", _ratio(r),
                f"≥ 0.9{_met(r is not None and r >= 0.9)}"),
            Row("producer", "  EventReader.poll alone, as configured (events/s)",
                _num(_median(rates["reader"])),
                f"pyvmomi read only {_num(_median(rates['pyvmomi']))}",
                _ratio(_median(drain["ratio_reader_to_pyvmomi"]))),
            Row("producer", "  pipeline tasks/s vs raw LPUSH",
                _num(_median(drain["tasks_per_s"])), f"raw push {_num(push)}",
                _ratio(ratio(_median(drain["tasks_per_s"]), push))),
        ]
    if "publish_per_s" in raw:
        r = _median(raw["ratio_publish_to_push"])
        out.append(Row("producer", f"Publisher.publish alone, {raw['messages']:,} tasks"
                       f"{', task-sent events on' if raw.get('task_sent_events') else ''} "
                       "(tasks/s)", _num(_median(raw["publish_per_s"])), f"raw push {_num(push)}",
                       _ratio(r), f"≥ 0.15{_met(r is not None and r >= 0.15)}"))
    backlog = sections.get("backlog") or {}
    if "events_per_s" in backlog:
        rates, peak = backlog["events_per_s"], backlog["peak_rss_mib"]
        added = _median(backlog["peak_rss_added_by_pipeline_mib"])
        tasks_per_s = (_median(rates["pipeline"]) or 0) * backlog["tasks"] / backlog["events"]
        out += [
            Row("producer", f"simulated backlog {backlog['events']:,} (events/s)",
                _num(_median(rates["pipeline"])),
                f"generate only {_num(_median(rates['generate']))}",
                _ratio(_median(backlog["ratio_pipeline_to_generate"]))),
            Row("producer", "  backlog tasks/s vs raw LPUSH", _num(tasks_per_s),
                f"raw push {_num(push)}", _ratio(ratio(tasks_per_s, push))),
            Row("producer", "  peak RSS (MiB)", _num(_median(peak["pipeline"]), 1),
                f"generate only {_num(_median(peak['generate']), 1)}",
                _ratio(_median(backlog["peak_rss_ratio_pipeline_to_generate"])),
                f"+{_num(added, 1)} MiB ≤ +50{_met(added is not None and added <= 50)}"),
        ]
    workers = sections.get("throughput") or {}
    for concurrency, case in (workers.get("by_concurrency") or {}).items():
        r = _median(case["ratio_echo_to_bare"])
        echo = _median(case["echo_tasks_per_s"])
        out.append(Row("worker", f"echo, prefork -c {concurrency} (tasks/s)", _num(echo),
                       f"bare no-op task {_num(_median(case['bare_tasks_per_s']))}", _ratio(r),
                       f"≥ 0.9{_met(r is not None and r >= 0.9)}"))
        out.append(Row("worker", f"  echo -c {concurrency} vs raw BRPOP", _num(echo),
                       f"raw pop {_num(pop)}", _ratio(ratio(echo, pop))))
    if "echo_scaling_1_to_2" in workers:
        out.append(Row("worker", "  scaling -c 1 → -c 2 (echo)",
                       f"×{workers['echo_scaling_1_to_2']:.2f}",
                       f"bare ×{workers['bare_scaling_1_to_2']:.2f}",
                       _ratio(workers["echo_scaling_1_to_2"] / workers["bare_scaling_1_to_2"])))
    latency = sections.get("latency") or {}
    for run in (latency.get("by_interval") or {}).values():
        interval = run["poll_interval"]
        mode = "notifications" if run.get("notifications", False) else "polling only"
        backoff = "" if run.get("max_poll_interval") is None else ", no back-off"
        for phase in ("idle", "load"):
            data = run[phase]["per_repeat"]
            p99 = _median(data["p99"])
            value = "/".join(_num(_median(data[f"p{p}"]), 3) for p in (50, 95, 99))
            out.append(Row("latency", f"{phase} {run[phase]['rate']:g}/s, poll {interval:g} s, "
                           f"{mode}{backoff}: p50/p95/p99 (s)", value,
                           f"poll interval {interval:g}", _ratio(ratio(p99, interval)),
                           f"p99 ≤ {run['goal_p99']:.2f}{_met(run[phase]['goal_met'])}"))
    polling_quiet = latency.get("quiet_calls_per_minute_polling_1s")
    for key, run in (latency.get("by_interval") or {}).items():
        calls = run.get("calls_per_minute")
        if not calls:
            continue
        notified = run.get("notifications", False)
        value = " / ".join(_num(_median(calls[phase]["total"])) for phase in
                           ("quiet", "idle", "load"))
        r = (latency.get("quiet_calls_ratio_to_polling_1s") or {}).get(key) if notified else None
        out.append(Row("latency", f"  vCenter SOAP calls/min quiet / idle / load, poll "
                       f"{run['poll_interval']:g} s, "
                       f"{'notifications' if notified else 'polling only'}", value,
                       f"polling 1 s, quiet {_num(polling_quiet)}" if r is not None else "",
                       _ratio(r) if r is not None else "",
                       f"quiet ≤ 1{_met(r <= 1)}" if r is not None else ""))
    vrops = sections.get("vrops") or {}
    if "calls_per_event" in vrops:
        calls = _median(vrops["calls_per_event"])
        out.append(Row("vrops", "vROps calls per maintenance event (steady)", _num(calls, 2),
                       f"walkthrough {vrops['walkthrough_calls_per_event']}",
                       _ratio(vrops["ratio_to_walkthrough"]),
                       f"≤ 2{_met(calls is not None and calls <= 2)}"))
        for label, model in vrops["models"].items():
            out.append(Row("vrops", f"maintenance events/s, {label} (50 ms/call)",
                           _num(_median(model["events_per_s"]), 1),
                           f"ideal {model['ideal_events_per_s']:g} (c / 50 ms)",
                           _ratio(model["ratio_to_ideal"])))
        if "ratio_threads_to_prefork_c4" in vrops:
            out.append(Row("vrops", "  threads vs prefork at -c 4", "",
                           "prefork -c 4", _ratio(vrops["ratio_threads_to_prefork_c4"]),
                           f"fastest: {vrops['fastest']}"))
    archive = sections.get("archive") or {}
    if "produce_per_s" in archive:
        rates = archive["produce_per_s"]
        out += [
            Row("archive", f"producer step with the archive, {archive['events']:,} events "
                "(events/s)", _num(_median(rates["with_archive"])),
                f"without {_num(_median(rates['without_archive']))}",
                _ratio(_median(archive["ratio_with_to_without"]))),
            Row("archive", "replay from the archive (events/s)",
                _num(_median(archive["replay_events_per_s"])),
                f"publish only {_num(_median(archive['publish_only_events_per_s']))}",
                _ratio(_median(archive["ratio_replay_to_publish"]))),
            Row("archive", "bytes per archived event (MEMORY USAGE)",
                _num(_median(archive["bytes_per_event"])),
                f"JSON {_num(_median(archive['json_bytes_per_event']))}",
                _ratio(_median(archive["ratio_bytes_to_json"]))),
        ]
    http = sections.get("http") or {}
    if "events_per_s" in http:
        rates = http["events_per_s"]
        direct = f"straight to the receiver {_num(_median(rates['direct']))}"
        out += [
            Row("http", f"senders → ingress → Redis → HTTP pool ({http['workers']} workers) → "
                "receiver (events/s)", _num(_median(rates["ingress"])), direct,
                _ratio(_median(http["ratio_ingress_to_direct"]))),
            Row("http", f"  the same, batches of {http['batch_size']} (events/s)",
                _num(_median(rates["ingress_batch"])), direct,
                _ratio(_median(http["ratio_ingress_batch_to_direct"]))),
            Row("http", "  ingress answered 202 (events/s)", _num(_median(rates["ingress_accept"])),
                direct, _ratio(_median(http["ratio_ingress_accept_to_direct"]))),
            Row("http", "  HTTP pool alone, tasks preloaded (events/s)",
                _num(_median(rates["pool"])), direct,
                _ratio(_median(http["ratio_pool_to_direct"]))),
            Row("http", "  lost / duplicates (all runs)",
                f"{sum(c['lost'] for c in http['checks'])} / "
                f"{sum(c['duplicates'] for c in http['checks'])}",
                f"{sum(c['sent'] for c in http['checks']):,} events sent", "", "0 / 0"),
        ]
    scrubbing = sections.get("scrub") or {}
    for name, case in (scrubbing.get("cases") or {}).items():
        out.append(Row("scrub", f"scrub 1 MiB, {name} (ms)", _num(_median(case["scrub_ms"]), 1),
                       f"str.replace floor {_num(_median(case['floor_ms']), 1)}",
                       _ratio(_median(case["ratio_scrub_to_floor"]))))
    fetch = sections.get("fetch") or {}
    if "per_s" in fetch:
        out.append(Row("fetch", f"take + ack {fetch['messages']:,} messages, atomic fetch "
                       "(messages/s)", _num(_median(fetch["per_s"]["vebaq"])),
                       f"kombu BRPOP + record {_num(_median(fetch['per_s']['kombu']))}",
                       _ratio(_median(fetch["ratio_vebaq_to_kombu"]))))
    routing = sections.get("routing") or {}
    if "us_per_event" in routing:
        per = routing["us_per_event"]
        attributes = f"attributes only {_num(_median(per['attributes']), 1)}"
        throttle = routing["throttle"]
        out += [
            Row("routing", f"{routing['triggers']} triggers with data filters (µs/event)",
                _num(_median(per["data"]), 1), attributes,
                _ratio(_median(routing["ratio_data_to_attributes"]))),
            Row("routing", f"  {routing['triggers']} attribute triggers, compiled vs per-call "
                "dispatch (µs/event)", _num(_median(per["attributes"]), 1),
                f"dispatch {_num(_median(per['dispatching']), 1)}",
                _ratio(_median(routing["ratio_compiled_to_dispatching"]))),
            Row("routing", f"  throttle decision in Redis, batch of {throttle['events']} "
                "(µs/event)", _num(_median(throttle["decide_us_per_event"]), 1),
                f"enqueue {_num(_median(throttle['publish_us_per_event']), 1)}",
                _ratio(_median(throttle["ratio_decide_to_publish"]))),
        ]
    if push is not None:
        out += [Row("raw", f"LPUSH, pipelines of 500, {raw['message_bytes']:,} B msgs (msg/s)",
                    _num(push)),
                Row("raw", "BRPOP one at a time (msg/s)", _num(pop))]
    return out


_HEADER = ("section", "measurement", "value", "baseline", "ratio", "goal")


def _cells(row: Row) -> tuple[str, ...]:
    return (row.section, row.measurement, row.value, row.baseline, row.ratio, row.goal)


def text_table(table: list[Row]) -> str:
    """Aligned plain text for the terminal."""
    lines = [_HEADER, *map(_cells, table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)


def markdown_table(table: list[Row]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |"
              for row in table]
    return "\n".join(lines)


def markdown(results: dict[str, Any], image: str) -> str:
    """``RESULTS.md``: the machine, the command, the table, the figure."""
    machine = results["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items() if v)
    code = results.get("code") or {}
    dirty = code.get("modified_files") or []
    tree = (f"`{code.get('commit')}`" + (f" plus uncommitted changes to {len(dirty)} file(s)"
                                          if dirty else ""))
    return f"""# Benchmark results

Measured by `{results['command']}` ({results['profile']} run, {results['repeats']} repeats per
figure; the value is the median, the ratio is the median of per-repeat ratios where the
baseline ran in the same repeat) on {results['started']}, taking {results['seconds']:.0f} s.
Code: {tree}.

Machine: {machine['nproc']} cores, {machine['cpu_model']}, Linux {machine['kernel']}, Python
{machine['python']}, Redis {machine['redis_server']} (local, TCP); {libs}. The machine is
shared and was not idle (load average {machine['load_average_at_start']} at the start): read
the ratios, not the absolute numbers.

{markdown_table(rows(results))}

![latency distribution, worker throughput, vROps events/s]({image})

What each figure is (details in the docstrings of `bench/*.py`):

- **producer drain**: events waiting in the vCenter simulator (the test peer: govmomi's model,
  collectors paging forward) taken off by the producer's `EventReader` →
  `ProducerService._convert` (CloudEvent, routing) → `_publish` (`Publisher`, task-sent events
  on; the archive; the checkpoint transaction); baseline: pyvmomi reading the same events with a
  bare collector (pages of 1,000). Default settings and triggers (1.3 tasks per event).
- **Publisher.publish alone**: the same task messages the raw push sends, from prepared
  `TaskMessage`s (one per simulated event), task-sent events on; baseline: raw push in the same
  repeat.
- **simulated backlog**: the built-in simulated source with the whole backlog waiting, drained
  by the same pipeline in a subprocess; baseline: a subprocess that only generates and pages the
  events. Peak RSS is `VmHWM`; both processes hold the generated backlog (the simulated source
  makes it up front), so the difference is what the pipeline adds.
- **worker**: prefork workers with the queue preloaded; timed from the first message taken to
  the queue empty with nothing unacked. Includes Celery's received/succeeded log lines and task
  events (`-E`) for both; the echo function's own logging of every event (to a file) is included.
- **latency**: the real producer process (default settings except the poll interval, with
  vCenter's change notifications — the default — and without: polling only) and a 2-process
  worker running a function that records `time.time()` − the event's `createdTime`; events
  posted at 1/s (idle) and 50/s (load). SOAP calls per minute from the producer's
  `vebaq_producer_vcenter_calls_total`, in each phase and while nothing happens (quiet).
- **vrops**: the vrops pool against the fake vROps answering each call after 50 ms; after a
  warm-up (tokens, resource ids cached). Ideal = concurrency / 50 ms.
- **http**: 8 sender threads (kept-alive sessions) post the simulated event mix in binary
  mode, one event per request, to `vebaq ingress`; 3 workers of an HTTP pool (`-P threads
  -c 8`) POST them to a CloudEvents receiver (the SDK on `http.server`, its own process); timed
  until the receiver has them all; also in batches of 50, and the pool alone (tasks published
  straight to its queue). Baseline: the same senders posting straight to the receiver.
- **raw**: the same task messages pushed with redis-py pipelines and popped one `BRPOP` each.
- **archive**: the producer's per-batch step (publish, archive, checkpoint) with and without the
  archive; `vebaq replay`'s loop re-enqueueing every archived event against publishing the same
  messages built beforehand; `MEMORY USAGE` of the stream per event against its JSON.
"""


def publish(results: dict[str, Any], target: Path) -> None:
    """Write ``RESULTS.md`` for ``target``'s directory, keeping its :data:`NOTES_HEADING`
    section (hand-written findings) if it has one."""
    body = markdown(results, "results.png")
    notes = ""
    if target.exists():
        old = target.read_text(encoding="utf-8")
        if NOTES_HEADING in old:
            notes = old[old.index(NOTES_HEADING):]
    target.write_text(body + ("\n" + notes if notes else ""), encoding="utf-8")
