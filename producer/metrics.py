"""Producer metrics (Prometheus), a VEBA-style ``/stats`` and a ``/healthz`` for probes.

One producer process may read several vCenters (:mod:`producer.supervisor`): every producer
metric carries a ``vcenter`` label (its SDK URL, the CloudEvents' ``source``), and each vCenter
has its own state (:class:`VCenterMetrics`), shown per vCenter in ``/stats`` and ``/healthz``.

Health, and why it is not "every vCenter is fine": a container orchestrator restarts a producer
whose probe fails, which would interrupt the vCenters that are fine to "fix" one that is down —
a restart cannot bring a vCenter back. So ``/healthz`` answers 503 only when a restart may help
and hurts nobody: the producer's own loop stalled, or *none* of the vCenters it reads works
(with one vCenter: that one is down, as before). One vCenter down among working ones is 200 with
``degraded: …`` on the first line and every vCenter's state on the lines below.
``/healthz/strict`` answers 503 as soon as any vCenter this producer reads is degraded, for
alerting and for operators who want "all or nothing".
"""

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

from producer import vcenter as vcenter_api
from producer.reader import EventReader, Stall
from vebaq.core import deadletters, replication, retrystore
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
    """SOAP calls to each vCenter per method, read at scrape time from
    :data:`producer.vcenter.CALLS`."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        calls = CounterMetricFamily("vebaq_producer_vcenter_calls",
                                    "SOAP calls to vCenter, per method (property reads: Fetch)",
                                    labels=["method", "vcenter"])
        for (url, method), count in sorted(vcenter_api.CALLS.items()):
            calls.add_metric([method, url], count)
        yield calls


class ReplicationCollector:
    """Confirmations no Redis replica acknowledged in time, read at scrape time from
    :data:`vebaq.core.replication.NOT_REPLICATED` (the write is on the master only: a failover
    then could lose it)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("vebaq_redis_not_replicated",
                                  "Writes no Redis replica acknowledged within the WAIT timeout",
                                  value=replication.NOT_REPLICATED)


class _Bound:
    """A labelled metric with its ``vcenter`` label filled in: ``.labels(pool=…)`` gives the
    child of that vCenter and pool."""

    def __init__(self, metric: Counter, vcenter: str) -> None:
        self.metric = metric
        self.vcenter = vcenter

    def labels(self, **labels: str) -> Counter:
        return self.metric.labels(vcenter=self.vcenter, **labels)


def _value(child: Counter | Gauge) -> float:
    return child._value.get()  # noqa: SLF001 - prometheus_client has no public getter


class VCenterMetrics:
    """One vCenter's metrics (children of the process's labelled metrics) and state.

    :param url: the vCenter's SDK URL (the ``vcenter`` label).
    """

    def __init__(self, parent: ProducerMetrics, url: str) -> None:
        self.url = url
        p = parent
        self.events_read = p.events_read.labels(vcenter=url)
        self.published = _Bound(p.published, url)
        self.publish_errors = p.publish_errors.labels(vcenter=url)
        self.malformed = p.malformed.labels(vcenter=url)
        self.reconnects = p.reconnects.labels(vcenter=url)
        self.archived = p.archived.labels(vcenter=url)
        self.archive_duplicates = p.archive_duplicates.labels(vcenter=url)
        self.archive_shed = p.archive_shed.labels(vcenter=url)
        self.archive_skipped = _Bound(p.archive_skipped, url)
        self.read_lag = p.read_lag.labels(vcenter=url)
        self.checkpoint_time = p.checkpoint_time.labels(vcenter=url)
        self.collector_resets = p.collector_resets.labels(vcenter=url)
        self.collector_gap = p.collector_gap.labels(vcenter=url)
        self.events_skipped = p.events_skipped.labels(vcenter=url)
        self.last_poll = p.last_poll.labels(vcenter=url)
        self.poll_failures = p.poll_failures.labels(vcenter=url)
        self.throttled = _Bound(p.throttled, url)
        self.batched = _Bound(p.batched, url)
        self.batches = _Bound(p.batches, url)
        #: The filter pushed down to vCenter, in words (``None``: every event is read).
        self.pushdown: str | None = None
        self.started = time.time()
        #: When this vCenter's loop last came round.
        self.heartbeat = time.time()
        self.connected = False
        #: This producer holds the vCenter's lease (it reads it); else ``holder`` may.
        self.held = False
        self.holder: str | None = None
        self.poll_stale_after = DEFAULT_POLL_STALE_AFTER
        self.last_poll_at: float | None = None
        self.last_poll_error: str | None = None
        self.stall: Stall | None = None
        #: When every event vCenter had was last known enqueued (see :attr:`lag`).
        self.caught_up_at: float | None = None
        self.instance_uuid: str | None = None
        self.checkpoint_key: int | None = None
        self._resets_seen = 0
        self._skipped_seen = 0

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

    def caught_up(self, as_of: float) -> None:
        """Every event vCenter had at ``as_of`` (epoch seconds, a poll's start) is enqueued."""
        self.caught_up_at = max(self.caught_up_at or 0.0, as_of)

    @property
    def lag(self) -> float | None:
        """Seconds since every event of this vCenter was last known enqueued: about the poll
        interval while all is well, growing while vCenter is down or a backlog drains; ``None``
        before the first poll."""
        return None if self.caught_up_at is None else max(0.0, time.time() - self.caught_up_at)

    def poll_failed(self, error: BaseException) -> None:
        self.poll_failures.inc()
        self.last_poll_error = f"{type(error).__name__}: {error}"[:200]

    def problem(self) -> str | None:
        """Why this vCenter is not read as it should be, in one line, or ``None``."""
        now = time.time()
        if not self.held:
            return None
        if now - self.heartbeat >= STALL_SECONDS:
            return f"stalled: the producer loop has not run for {now - self.heartbeat:.0f}s"
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
        return self.problem() is None

    def state(self) -> str:
        """``ok``, the problem, ``standby: read by <producer>`` or ``unassigned``."""
        if self.held:
            return self.problem() or "ok"
        return f"standby: read by {self.holder}" if self.holder else "unassigned"

    def stats(self) -> dict:
        published = {pool: int(value) for pool, value in _per_label(
            self.published.metric, "pool", self.url).items()}
        lag = self.lag
        return {"held": self.held, "holder": self.holder, "state": self.state(),
                "connected": self.connected, "instance_uuid": self.instance_uuid,
                "pushdown": self.pushdown,
                "events_read": int(_value(self.events_read)), "published_per_pool": published,
                "publish_errors": int(_value(self.publish_errors)),
                "checkpoint_key": self.checkpoint_key,
                "lag_seconds": None if lag is None or not self.held else round(lag, 3)}


def _per_label(counter: Counter, label: str, vcenter: str | None = None) -> dict[str, float]:
    """A counter's totals by ``label``, of one vCenter or summed over all."""
    totals: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and vcenter in (None, sample.labels["vcenter"]):
                value = sample.labels[label]
                totals[value] = totals.get(value, 0.0) + sample.value
    return totals


class _StateCollector:
    """Gauges read from the vCenters' state at scrape time."""

    def __init__(self, metrics: ProducerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m = self.metrics
        vcenters = list(m.vcenters.values())
        held = GaugeMetricFamily("vebaq_producer_vcenter_held",
                                 "1 if this producer holds the vCenter's lease (reads it)",
                                 labels=["vcenter"])
        healthy = GaugeMetricFamily("vebaq_producer_vcenter_healthy",
                                    "1 if a vCenter this producer reads is logged in, polled "
                                    "and caught up (see /healthz)", labels=["vcenter"])
        lag = GaugeMetricFamily("vebaq_producer_lag_seconds",
                                "Seconds since every event of the vCenter was last known "
                                "enqueued", labels=["vcenter"])
        for vc in vcenters:
            held.add_metric([vc.url], 1 if vc.held else 0)
            if vc.held:
                healthy.add_metric([vc.url], 1 if vc.healthy() else 0)
                if vc.lag is not None:
                    lag.add_metric([vc.url], vc.lag)
        yield from (held, healthy, lag)
        yield GaugeMetricFamily("vebaq_producer_live_producers",
                                "Producers announcing themselves in Redis (this one included)",
                                value=m.live_producers)
        yield GaugeMetricFamily("vebaq_producer_lease_share",
                                "vCenters this producer reads at most: ceil(vCenters / live "
                                "producers)", value=m.share)
        info = GaugeMetricFamily("vebaq_producer_info", "This producer's id (host:pid:random)",
                                 labels=["producer"])
        info.add_metric([m.producer_id], 1)
        yield info


class ProducerMetrics:
    """Counters and gauges of one producer process, labelled per vCenter (own registry: tests
    run several).

    :param producer_id: the producer's id (:func:`producer.lease.producer_id`).
    """

    def __init__(self, producer_id: str = "") -> None:
        self.registry = CollectorRegistry()
        self.producer_id = producer_id
        r = self.registry
        vc = ["vcenter"]
        self.events_read = Counter("vebaq_producer_events_read", "vCenter events read", vc,
                                   registry=r)
        self.published = Counter("vebaq_producer_tasks_published",
                                 "Tasks enqueued, per pool", ["pool", "vcenter"], registry=r)
        self.publish_errors = Counter("vebaq_producer_publish_errors",
                                      "Batches Redis did not take (kept and retried)", vc,
                                      registry=r)
        self.malformed = Counter("vebaq_producer_malformed_events",
                                 "Events that could not be converted (dead-lettered)", vc,
                                 registry=r)
        self.reconnects = Counter("vebaq_producer_vcenter_reconnects",
                                  "vCenter logins after a lost session", vc, registry=r)
        self.archived = Counter("vebaq_producer_archived_events", "Events archived", vc,
                                registry=r)
        self.archive_duplicates = Counter(
            "vebaq_producer_archive_duplicates",
            "Events of a batch sent again that were archived already (not archived twice)", vc,
            registry=r)
        self.archive_shed = Counter(
            "vebaq_producer_archive_shed",
            "Oldest archived events dropped early because Redis was near maxmemory", vc,
            registry=r)
        self.archive_skipped = Counter(
            "vebaq_producer_archive_skipped",
            "Enqueued events not archived (reason: memory, oom, error)", ["reason", "vcenter"],
            registry=r)
        self.read_lag = Gauge("vebaq_producer_read_lag_seconds",
                              "Now minus the newest published event's creation time", vc,
                              registry=r)
        self.checkpoint_time = Gauge("vebaq_producer_checkpoint_timestamp_seconds",
                                     "When the checkpoint was last advanced", vc, registry=r)
        self.collector_resets = Counter("vebaq_collector_resets",
                                        "Event collectors replaced because they stopped returning "
                                        "events vCenter had", vc, registry=r)
        self.collector_gap = Gauge("vebaq_collector_gap_events",
                                   "Events vCenter holds that the collector did not return (0 "
                                   "when caught up)", vc, registry=r)
        self.events_skipped = Counter("vebaq_producer_events_skipped",
                                      "Event keys vCenter no longer held when the reader got to "
                                      "them (retention ran out): never delivered", vc,
                                      registry=r)
        self.last_poll = Gauge("vebaq_producer_last_poll_timestamp_seconds",
                               "When a poll of vCenter last succeeded", vc, registry=r)
        self.poll_failures = Counter("vebaq_producer_vcenter_poll_failures",
                                     "Polls and logins of vCenter that failed (timeouts "
                                     "included)", vc, registry=r)
        per_trigger = ["trigger", "vcenter"]
        self.throttled = Counter("vebaq_producer_throttled",
                                 "Events a trigger's throttle suppressed (once_within, "
                                 "once_after)", per_trigger, registry=r)
        self.batched = Counter("vebaq_producer_batched",
                               "Events a trigger's throttle held for a batch", per_trigger,
                               registry=r)
        self.batches = Counter("vebaq_producer_batches",
                               "Batch tasks sent by throttled triggers", per_trigger, registry=r)
        self.started = time.time()
        #: When the producer's own loop (the supervisor's) last came round.
        self.heartbeat = time.time()
        self.live_producers = 1
        self.share = 0
        #: Every configured vCenter's metrics and state, by URL, in configuration order.
        self.vcenters: dict[str, VCenterMetrics] = {}
        self._lock = threading.Lock()
        r.register(_StateCollector(self))
        r.register(VCenterCallsCollector())
        r.register(ReplicationCollector())

    def vcenter(self, url: str) -> VCenterMetrics:
        """The metrics of the vCenter at ``url`` (made on first use)."""
        with self._lock:
            if url not in self.vcenters:
                self.vcenters[url] = VCenterMetrics(self, url)
            return self.vcenters[url]

    def watch_queues(self, redis_client: redis.Redis, pools: set[str],
                     archive: Archive | None = None) -> None:
        """Also export dead-letter, retry and queue depths, and the archive, from this Redis."""
        self.registry.register(QueueStateCollector(redis_client, pools, archive))

    def stats(self) -> dict:
        """The VEBA router's ``/stats`` shape (per provider/processor counts, summed over the
        vCenters), with each vCenter's own under ``vcenters``."""
        vcenters = {url: vc.stats() for url, vc in self.vcenters.items()}
        held = [v for v in vcenters.values() if v["held"]]
        throttled: dict[str, dict[str, int]] = {}
        for kind, counter in (("suppressed", self.throttled), ("batched", self.batched),
                              ("batches", self.batches)):
            for trigger, count in _per_label(counter, "trigger").items():
                throttled.setdefault(trigger, {"suppressed": 0, "batched": 0, "batches": 0})
                throttled[trigger][kind] = int(count)
        # The pushdown follows from the triggers: the same for every vCenter.
        pushdown = next((v["pushdown"] for v in held if v["pushdown"]), None)
        return {
            "vcenter": {"started": self.started,
                        "events_read": sum(v["events_read"] for v in vcenters.values()),
                        "connected": bool(held) and all(v["connected"] for v in held),
                        "pushdown": pushdown},
            "celery": {"started": self.started,
                       "published_per_pool": {k: int(v) for k, v in
                                              _per_label(self.published, "pool").items()},
                       "publish_errors": sum(v["publish_errors"] for v in vcenters.values())},
            "throttled": throttled,
            "producer": {"id": self.producer_id, "live_producers": self.live_producers,
                         "share": self.share, "reading": [u for u, v in vcenters.items()
                                                          if v["held"]]},
            "vcenters": vcenters,
        }

    def health(self, strict: bool = False) -> tuple[bool, str]:
        """``(healthy, body)`` of ``/healthz`` (``strict``: of ``/healthz/strict``); see the
        module docstring."""
        now = time.time()
        if now - self.heartbeat >= STALL_SECONDS:
            return False, f"stalled: the producer loop has not run for {now - self.heartbeat:.0f}s"
        vcenters = list(self.vcenters.values())
        held = [vc for vc in vcenters if vc.held]
        bad = [(vc.url, problem) for vc in held if (problem := vc.problem())]
        if len(vcenters) <= 1:  # one vCenter: one line, as before several were possible
            return not bad, bad[0][1] if bad else "ok"
        if bad:
            head = (f"degraded: {len(bad)} of the {len(held)} vCenter(s) read here: "
                    + "; ".join(f"{url}: {problem}" for url, problem in bad))
        else:
            head = f"ok: reading {len(held)} of {len(vcenters)} vCenter(s)"
        healthy = not bad or (not strict and len(bad) < len(held))
        return healthy, "\n".join([head, *(f"{vc.url}: {vc.state()}" for vc in vcenters)])

    def problem(self) -> str | None:
        """Why ``/healthz`` fails, in one line, or ``None``."""
        healthy, body = self.health()
        return None if healthy else body.splitlines()[0]

    def healthy(self) -> bool:
        return self.health()[0]


def serve(metrics: ProducerMetrics, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/stats``, ``/healthz`` and ``/healthz/strict`` on a daemon
    thread; a port that cannot be opened (taken, privileged) raises :class:`ConfigError` saying
    so."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                body, kind, status = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/stats":
                body, kind, status = json.dumps(metrics.stats()).encode(), "application/json", 200
            elif self.path in ("/healthz", "/healthz/strict"):
                healthy, text = metrics.health(strict=self.path == "/healthz/strict")
                body = text.encode()
                kind, status = "text/plain; charset=utf-8", 200 if healthy else 503
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
