"""Producer metrics (Prometheus), a VEBA-style ``/stats`` and a ``/healthz`` for probes."""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from producer import vcenter
from producer.reader import EventReader, Stall
from vebaq.core import deadletters, retrystore
from vebaq.core.archive import Archive
from vebaq.core.errors import ConfigError

#: ``/healthz`` fails when the main loop has not come round for this many seconds.
STALL_SECONDS = 120

#: ``/healthz`` says degraded when no poll of vCenter succeeded for this many seconds (the
#: service sets it from the poll interval and the request timeout).
DEFAULT_POLL_STALE_AFTER = 30.0


class QueueStateCollector:
    """Read at scrape time from Redis: dead letters per subject and pool, pending retries, each
    pool queue's depth (Flower's /metrics has no queue length), and each vCenter's archive."""

    def __init__(self, redis_client: redis.Redis, pools: set[str],
                 archive: Archive | None = None) -> None:
        self.redis = redis_client
        self.pools = pools
        self.archive = archive

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            letters = deadletters.counts(self.redis)
            retries = retrystore.pending(self.redis)
            depths = {pool: self.redis.llen(pool) for pool in sorted(self.pools)}
            archives = ([self.archive.stats(uuid) for uuid in sorted(self.archive.sources())]
                        if self.archive is not None else [])
        except redis.RedisError:
            return  # a scrape while Redis is away shows the producer's own metrics only
        dead = GaugeMetricFamily("vebaq_dead_letters", "Dead letters waiting for replay",
                                 labels=["subject", "pool"])
        for (subject, pool), count in sorted(letters.items(), key=str):
            dead.add_metric([str(subject), str(pool)], count)
        yield dead
        yield GaugeMetricFamily("vebaq_retries_pending", "Retries waiting for their back-off",
                                value=retries)
        queued = GaugeMetricFamily("vebaq_queue_depth", "Tasks waiting in a pool's queue",
                                   labels=["pool"])
        for pool, depth in depths.items():
            queued.add_metric([pool], depth)
        yield queued
        if self.archive is None:
            return
        labels = ["source", "vcenter_uuid"]
        length = GaugeMetricFamily("vebaq_archive_events", "Events in a vCenter's archive",
                                   labels=labels)
        size = GaugeMetricFamily("vebaq_archive_bytes",
                                 "Bytes of a vCenter's archive (as counted against maxBytes)",
                                 labels=labels)
        age = GaugeMetricFamily("vebaq_archive_oldest_age_seconds",
                                "Age of the oldest archived event", labels=labels)
        now = time.time()
        for stats in archives:
            names = [stats.source, stats.instance_uuid]
            length.add_metric(names, stats.length)
            size.add_metric(names, stats.bytes)
            if stats.oldest is not None:
                age.add_metric(names, max(0.0, now - stats.oldest.timestamp()))
        yield from (length, size, age)


class VCenterCallsCollector:
    """SOAP calls to vCenter per method, read at scrape time from :data:`producer.vcenter.CALLS`
    (process-wide: one producer per process)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        calls = CounterMetricFamily("vebaq_producer_vcenter_calls",
                                    "SOAP calls to vCenter, per method (property reads: Fetch)",
                                    labels=["method"])
        for method, count in sorted(vcenter.CALLS.items()):
            calls.add_metric([method], count)
        yield calls


class ProducerMetrics:
    """Counters and gauges of one producer process (own registry: tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_read = Counter("vebaq_producer_events_read", "vCenter events read", registry=r)
        self.published = Counter("vebaq_producer_tasks_published",
                                 "Tasks enqueued, per pool", ["pool"], registry=r)
        self.publish_errors = Counter("vebaq_producer_publish_errors",
                                      "Batches Redis did not take (kept and retried)", registry=r)
        self.malformed = Counter("vebaq_producer_malformed_events",
                                 "Events that could not be converted (dead-lettered)", registry=r)
        self.reconnects = Counter("vebaq_producer_vcenter_reconnects",
                                  "vCenter logins after a lost session", registry=r)
        self.archived = Counter("vebaq_producer_archived_events", "Events archived", registry=r)
        self.archive_duplicates = Counter(
            "vebaq_producer_archive_duplicates",
            "Events of a batch sent again that were archived already (not archived twice)",
            registry=r)
        self.archive_shed = Counter(
            "vebaq_producer_archive_shed",
            "Oldest archived events dropped early because Redis was near maxmemory", registry=r)
        self.archive_skipped = Counter(
            "vebaq_producer_archive_skipped",
            "Enqueued events not archived (reason: memory, oom, error)", ["reason"], registry=r)
        self.read_lag = Gauge("vebaq_producer_read_lag_seconds",
                              "Now minus the newest published event's creation time", registry=r)
        self.checkpoint_time = Gauge("vebaq_producer_checkpoint_timestamp_seconds",
                                     "When the checkpoint was last advanced", registry=r)
        self.collector_resets = Counter("vebaq_collector_resets",
                                        "Event collectors replaced because they stopped returning "
                                        "events vCenter had", registry=r)
        self.collector_gap = Gauge("vebaq_collector_gap_events",
                                   "Events vCenter holds that the collector did not return (0 "
                                   "when caught up)", registry=r)
        self.events_skipped = Counter("vebaq_producer_events_skipped",
                                      "Event keys vCenter no longer held when the reader got to "
                                      "them (retention ran out): never delivered", registry=r)
        self.last_poll = Gauge("vebaq_producer_last_poll_timestamp_seconds",
                               "When a poll of vCenter last succeeded", registry=r)
        self.poll_failures = Counter("vebaq_producer_vcenter_poll_failures",
                                     "Polls and logins of vCenter that failed (timeouts "
                                     "included)", registry=r)
        self.throttled = Counter("vebaq_producer_throttled",
                                 "Events a trigger's throttle suppressed (once_within, "
                                 "once_after)", ["trigger"], registry=r)
        self.batched = Counter("vebaq_producer_batched",
                               "Events a trigger's throttle held for a batch", ["trigger"],
                               registry=r)
        self.batches = Counter("vebaq_producer_batches",
                               "Batch tasks sent by throttled triggers", ["trigger"], registry=r)
        #: The filter pushed down to vCenter, in words (``None``: every event is read).
        self.pushdown: str | None = None
        r.register(VCenterCallsCollector())
        self.started = time.time()
        self.heartbeat = time.time()
        self.connected = False
        self.standing_by = False
        self.poll_stale_after = DEFAULT_POLL_STALE_AFTER
        self.last_poll_at: float | None = None
        self.last_poll_error: str | None = None
        self.stall: Stall | None = None
        self._resets_seen = 0
        self._skipped_seen = 0

    def watch_queues(self, redis_client: redis.Redis, pools: set[str],
                     archive: Archive | None = None) -> None:
        """Also export dead-letter, retry and queue depths, and the archive, from this Redis."""
        self.registry.register(QueueStateCollector(redis_client, pools, archive))

    def stats(self) -> dict:
        """The VEBA router's ``/stats`` shape: per provider/processor counts."""
        published = _per_label(self.published, "pool")
        throttled: dict[str, dict[str, int]] = {}
        for kind, counter in (("suppressed", self.throttled), ("batched", self.batched),
                              ("batches", self.batches)):
            for trigger, count in _per_label(counter, "trigger").items():
                throttled.setdefault(trigger, {"suppressed": 0, "batched": 0, "batches": 0})
                throttled[trigger][kind] = count
        return {
            "vcenter": {"started": self.started, "events_read": int(self.events_read._value.get()),
                        "connected": self.connected, "pushdown": self.pushdown},
            "celery": {"started": self.started, "published_per_pool": published,
                       "publish_errors": int(self.publish_errors._value.get())},
            "throttled": throttled,
        }

    def polled(self, reader: EventReader, events: int) -> None:
        """A poll succeeded: count it, and take over the reader's watchdog figures."""
        self.events_read.inc(events)
        now = time.time()
        self.last_poll_at = now
        self.last_poll.set(now)
        self.last_poll_error = None
        self.collector_resets.inc(reader.resets - self._resets_seen)
        self.events_skipped.inc(reader.skipped - self._skipped_seen)
        self._resets_seen, self._skipped_seen = reader.resets, reader.skipped
        self.stall = reader.stall
        self.collector_gap.set(self.stall.gap if self.stall is not None else 0)

    def poll_failed(self, error: BaseException) -> None:
        self.poll_failures.inc()
        self.last_poll_error = f"{type(error).__name__}: {error}"[:200]

    def problem(self) -> str | None:
        """Why ``/healthz`` is not ok, in one line, or ``None``."""
        now = time.time()
        if now - self.heartbeat >= STALL_SECONDS:
            return f"stalled: the producer loop has not run for {now - self.heartbeat:.0f}s"
        if self.standing_by:
            return None
        if not self.connected:
            reason = f" ({self.last_poll_error})" if self.last_poll_error else ""
            return f"degraded: not logged in to vCenter{reason}"
        if self.stall is not None:
            return f"degraded: {self.stall.describe()}"
        last = self.last_poll_at or self.started
        if now - last >= self.poll_stale_after:
            reason = f" (last error: {self.last_poll_error})" if self.last_poll_error else ""
            return f"degraded: no successful poll of vCenter for {now - last:.0f}s{reason}"
        return None

    def healthy(self) -> bool:
        """Logged in to vCenter (or standing by for another producer), polling, caught up."""
        return self.problem() is None


def _per_label(counter: Counter, label: str) -> dict[str, int]:
    return {s.labels[label]: int(s.value) for m in counter.collect() for s in m.samples
            if s.name.endswith("_total")}


def serve(metrics: ProducerMetrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/stats`` and ``/healthz`` on a daemon thread; a port that cannot
    be opened (taken, privileged) raises :class:`ConfigError` saying so."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                body, kind, status = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/stats":
                body, kind, status = json.dumps(metrics.stats()).encode(), "application/json", 200
            elif self.path == "/healthz":
                problem = metrics.problem()
                body = (problem or "ok").encode()
                kind, status = "text/plain; charset=utf-8", 200 if problem is None else 503
            else:
                body, kind, status = b"not found", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep probes out of the logs
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        reason = {errno.EADDRINUSE: "is in use", errno.EACCES: "needs privileges (use one ≥ 1024)",
                  errno.EADDRNOTAVAIL: f"cannot be bound on {host}"}.get(
                      exc.errno, f"cannot be opened ({exc.strerror or exc})")
        raise ConfigError(f"metrics port {port} {reason}: set --metrics-port or "
                          f"VEBAQ_METRICS_PORT to a free port (0 disables it)") from None
    threading.Thread(target=server.serve_forever, name="vebaq-metrics", daemon=True).start()
    return server
