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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vebaq.core import deadletters, retrystore
from vebaq.core.errors import ConfigError

#: ``/healthz`` fails when the main loop has not come round for this many seconds.
STALL_SECONDS = 120


class QueueStateCollector:
    """Read at scrape time from Redis: dead letters per subject and pool, pending retries, and
    each pool queue's depth (Flower's /metrics has no queue length)."""

    def __init__(self, redis_client: redis.Redis, pools: set[str]) -> None:
        self.redis = redis_client
        self.pools = pools

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            letters = deadletters.counts(self.redis)
            retries = retrystore.pending(self.redis)
            depths = {pool: self.redis.llen(pool) for pool in sorted(self.pools)}
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
        self.read_lag = Gauge("vebaq_producer_read_lag_seconds",
                              "Now minus the newest published event's creation time", registry=r)
        self.checkpoint_time = Gauge("vebaq_producer_checkpoint_timestamp_seconds",
                                     "When the checkpoint was last advanced", registry=r)
        self.started = time.time()
        self.heartbeat = time.time()
        self.connected = False
        self.standing_by = False

    def watch_queues(self, redis_client: redis.Redis, pools: set[str]) -> None:
        """Also export dead-letter, retry and queue depths from this Redis."""
        self.registry.register(QueueStateCollector(redis_client, pools))

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
    """Serve ``/metrics``, ``/stats`` and ``/healthz`` on a daemon thread; a port that cannot
    be opened (taken, privileged) raises :class:`ConfigError` saying so."""

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
