"""Producer metrics (Prometheus), a VEBA-style ``/stats`` and a ``/healthz`` for probes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vebaq.core import deadletters, retrystore
from vebaq.core.archive import Archive

#: ``/healthz`` fails when the main loop has not come round for this many seconds.
STALL_SECONDS = 120


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
        self.started = time.time()
        self.heartbeat = time.time()
        self.connected = False
        self.standing_by = False

    def watch_queues(self, redis_client: redis.Redis, pools: set[str],
                     archive: Archive | None = None) -> None:
        """Also export dead-letter, retry and queue depths, and the archive, from this Redis."""
        self.registry.register(QueueStateCollector(redis_client, pools, archive))

    def stats(self) -> dict:
        """The VEBA router's ``/stats`` shape: per provider/processor counts."""
        published = {s.labels["pool"]: int(s.value) for m in self.published.collect()
                     for s in m.samples if s.name.endswith("_total")}
        return {
            "vcenter": {"started": self.started, "events_read": int(self.events_read._value.get()),
                        "connected": self.connected},
            "celery": {"started": self.started, "published_per_pool": published,
                       "publish_errors": int(self.publish_errors._value.get())},
        }

    def healthy(self) -> bool:
        """Logged in to vCenter (or standing by for another producer), and not stalled."""
        return (self.connected or self.standing_by) and \
            time.time() - self.heartbeat < STALL_SECONDS


def serve(metrics: ProducerMetrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/stats`` and ``/healthz`` on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                body, kind, status = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/stats":
                body, kind, status = json.dumps(metrics.stats()).encode(), "application/json", 200
            elif self.path == "/healthz":
                ok = metrics.healthy()
                body, kind, status = (b"ok" if ok else b"stalled"), "text/plain", 200 if ok else 503
            else:
                body, kind, status = b"not found", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep probes out of the logs
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="vebaq-metrics", daemon=True).start()
    return server
