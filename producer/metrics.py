"""Producer metrics (Prometheus), a VEBA-style ``/stats`` and a ``/healthz`` for probes."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: ``/healthz`` fails when the main loop has not come round for this many seconds.
STALL_SECONDS = 120


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
        return time.time() - self.heartbeat < STALL_SECONDS


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
