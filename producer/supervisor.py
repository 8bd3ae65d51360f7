"""One producer process, any number of vCenters: a lease, a thread and a reader per vCenter, and
the leases shared out among all the producers (``docker compose up --scale producer=N``).

**Isolation.** Every vCenter this process reads has its own thread running a
:class:`~producer.service.ProducerService`: its own session, collector, checkpoint, lease and
metrics. A vCenter that is down, slow, hung or refusing the password holds up its own thread
only (each SOAP call is bounded by its ``requestTimeout``, logins are retried in that thread);
the others keep polling at their interval. What they do share: Redis (a thread-safe client
pool), the Celery app's producer pool, and the interpreter — a vCenter draining a large backlog
takes CPU from the others.

**Sharing out.** Every :data:`~producer.membership.HEARTBEAT_INTERVAL` the supervisor beats
(:mod:`producer.membership`), and with ``live`` producers and ``M`` configured vCenters reads at
most ``share = ceil(M / live)``:

* holding fewer, it takes free leases, in its order of preference (rendezvous hashing of its id
  and the vCenter's URL: producers prefer different vCenters, so they seldom race for one);
* holding more for :data:`REBALANCE_AFTER` seconds (a producer joined), it hands the least
  preferred one over *gracefully*: that vCenter's loop stops after the batch in hand (enqueued,
  archived, checkpoint committed), logs out, and then the lease is released; another producer
  takes it from the checkpoint. One at a time, and not taken back for :data:`HANDOVER_COOLDOWN`.

When a producer dies, its leases expire after :data:`~producer.lease.LEASE_TTL` and the others
take them on their next round (their shares grew when its heartbeat went stale, sooner). The
checkpoint is per vCenter and its commit is fenced by the lease: whoever reads next starts
exactly after the last committed batch — nothing lost, nothing doubled.

**Failures.** With one vCenter, a failed first login ends the process with its one-line error,
as it always did (a typo shows at once; no other vCenter would suffer from the exit). With
several, it is that vCenter's degraded state (``/healthz``, ``/stats``, ``vebaq status``) and is
retried in its thread. A loop that fails unexpectedly is logged with its traceback, its lease
released, and retried after :data:`FAILURE_COOLDOWN` (by whichever producer takes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import redis
from celery import Celery

from producer.lease import Lease, producer_id, vcenter_scope
from producer.membership import HEARTBEAT_INTERVAL, HEARTBEAT_TTL, Membership, share
from producer.metrics import ProducerMetrics, VCenterMetrics
from producer.service import ProducerService
from producer.simulated import SIMULATED_URL
from producer.vcenter import check
from vebaq.core.archive import Archive
from vebaq.core.broker import sender_app
from vebaq.core.config import Settings, VCenterSettings
from vebaq.core.errors import BrokerError, VebaqError
from vebaq.core.logs import label_thread
from vebaq.core.publish import Publisher
from vebaq.core.redisdb import check as check_redis
from vebaq.core.redisdb import client, explain_redis_error, out_of_memory
from vebaq.core.secrets import redact_url, scrub

logger = logging.getLogger("vebaq.producer")

#: Seconds a producer holds more than its share before it hands one vCenter over: longer than a
#: dead producer is still counted (:data:`~producer.membership.HEARTBEAT_TTL`), so a producer
#: restarted at once does not make the others give vCenters away for nothing.
REBALANCE_AFTER = HEARTBEAT_TTL + 1.0

#: Seconds a vCenter handed over is not taken back by the producer that gave it away.
HANDOVER_COOLDOWN = 5.0

#: Seconds before a vCenter whose loop failed unexpectedly is tried again by this producer.
FAILURE_COOLDOWN = 30.0

#: Seconds a clean stop waits for the vCenter loops to finish their batches (Compose's stop
#: grace period is 30 s); a loop still in a call then leaves its lease to expire.
SHUTDOWN_GRACE = 25.0

#: Seconds between two warnings that Redis does not take the heartbeat.
BEAT_WARNING_INTERVAL = 30.0


@dataclass
class Shard:
    """One configured vCenter, as this producer sees it."""

    vcenter: VCenterSettings
    lease: Lease
    metrics: VCenterMetrics
    #: How its log lines start (``[vc01.example.com]``) when the process reads several.
    label: str
    service: ProducerService | None = None
    thread: threading.Thread | None = None
    error: BaseException | None = None
    #: Its loop was told to stop so that another producer can take it.
    handing_over: bool = False
    #: ``time.monotonic()`` before which this producer does not take it.
    cooldown_until: float = 0.0
    #: Another producer that holds its lease, as last seen.
    other_holder: str | None = None

    @property
    def url(self) -> str:
        return self.metrics.url

    @property
    def running(self) -> bool:
        return self.thread is not None


def _label(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1] or url


class Supervisor:
    """Runs until :attr:`stop` is set (see the module docstring).

    :param settings: the loaded configuration (every vCenter in ``settings.vcenters``).
    :param app: the Celery app to publish with (a sender app for the settings by default).
    :param simulate: read the built-in simulated source instead (one, whatever is configured),
        with these :class:`~producer.simulated.SimulatedReader` options.
    """

    def __init__(self, settings: Settings, app: Celery | None = None,
                 simulate: dict | None = None) -> None:
        self.settings = settings
        self.simulate = simulate
        self.id = producer_id()
        self.stop = threading.Event()
        self.redis = client(settings.broker_url)
        self.app = app or sender_app(settings, "vebaq-producer")
        self.publisher = Publisher(self.app)
        self.metrics = ProducerMetrics(self.id)
        self.membership = Membership(self.redis, self.id)
        if simulate is not None:
            vcenters = (replace(settings.vcenter, url=SIMULATED_URL),)
        else:
            vcenters = settings.vcenters
        self.shards = [self._shard(vc) for vc in vcenters]
        #: One vCenter: a failed first login ends the process, as before (module docstring).
        self.fail_fast = len(self.shards) == 1
        self.live = 1
        self.share = len(self.shards)
        self.started = time.time()
        self._surplus_since: float | None = None
        self._beat_warned = 0.0
        self._fatal: BaseException | None = None
        self._rounds = 0

    def _shard(self, vc: VCenterSettings) -> Shard:
        url = vc.url or ""  # none configured: check() says so before anything runs
        scope = vcenter_scope(None if self.simulate is not None else url)
        return Shard(vc, Lease(self.redis, scope, holder=self.id), self.metrics.vcenter(url),
                     _label(url))

    # --- start-up: every failure here is one clear line and a non-zero exit

    def check(self) -> None:
        """Redis answers, and every vCenter has what a login needs (else the key is named)."""
        check_redis(self.settings.broker_url, self.settings.secrets())
        if self.simulate is None:
            for shard in self.shards:
                check(shard.vcenter)

    # --- the loop

    def run(self) -> None:
        """Check, then share, read and hand over vCenters until stopped; a clean stop lets every
        loop finish its batch and releases the leases."""
        self.check()
        archive = Archive(self.redis, self.settings.archive) if self.settings.archive.enabled \
            else None
        self.metrics.watch_queues(self.redis, {t.pool for t in self.settings.triggers},
                                  archive=archive)
        if len(self.shards) > 1:
            logger.info("producer %s: %d vCenters configured (%s), shared with the other "
                        "producers on %s", self.id, len(self.shards),
                        ", ".join(s.url for s in self.shards),
                        redact_url(self.settings.broker_url))
        try:
            while not self.stop.is_set():
                self.round()
                if self._fatal is not None:
                    raise self._fatal
                self.stop.wait(HEARTBEAT_INTERVAL)
        finally:
            self.shutdown()

    def round(self) -> None:
        """One round: collect ended loops, beat, then take or hand over leases."""
        self.metrics.heartbeat = time.time()
        self._reap()
        if self._fatal is not None:
            return
        try:
            live = self.membership.beat(self.state())
        except redis.RedisError as exc:
            if not self._rounds:
                self._fatal = self._start_failed(exc)
                return
            # Take nothing, hand nothing over: the leases expire by themselves if Redis stays
            # away, and the loops say what they cannot do.
            if time.monotonic() - self._beat_warned >= BEAT_WARNING_INTERVAL:
                self._beat_warned = time.monotonic()
                logger.warning("Redis does not take the producer heartbeat (%s): leases neither "
                               "taken nor handed over meanwhile",
                               explain_redis_error(exc, self.redis))
            return
        previous = self.share
        self.live, self.share = live, share(len(self.shards), live)
        self.metrics.live_producers, self.metrics.share = self.live, self.share
        if len(self.shards) > 1 and self.share != previous:
            logger.info("%d producer(s) share %d vCenters: reading at most %d here", live,
                        len(self.shards), self.share)
        try:
            self._rebalance()
        except redis.RedisError as exc:
            if not self._rounds:
                self._fatal = self._start_failed(exc)
                return
            logger.warning("cannot take or hand over leases this round: %s",
                           explain_redis_error(exc, self.redis))
        self._rounds += 1

    def _start_failed(self, exc: redis.RedisError) -> BrokerError:
        """Redis failing the first round (it answered the ping, but e.g. is out of memory):
        one line, as any start-up failure; later it is a warning and the next round."""
        detail = scrub(explain_redis_error(exc, self.redis), self.settings.secrets())
        return BrokerError(detail if out_of_memory(exc) else
                           f"Redis at {redact_url(self.settings.broker_url)}: {detail}")

    def _preference(self, shard: Shard) -> int:
        digest = hashlib.sha256(f"{self.id}|{shard.lease.scope}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    def _rebalance(self) -> None:
        held = [s for s in self.shards if s.running]
        now = time.monotonic()
        room = self.share - len(held)
        if room < 0:
            self._surplus_since = self._surplus_since or now
            if now - self._surplus_since >= REBALANCE_AFTER and \
                    not any(s.handing_over for s in held):
                self._hand_over(min(held, key=self._preference))
                self._surplus_since = None
        else:
            self._surplus_since = None
        idle = sorted((s for s in self.shards if not s.running), key=self._preference,
                      reverse=True)
        for shard in idle:
            if room > 0 and shard.cooldown_until <= now and self._take(shard):
                room -= 1
                continue
            self._note_holder(shard)

    def _note_holder(self, shard: Shard) -> None:
        """Who reads a vCenter this producer does not (shown in /stats and /healthz)."""
        holder = shard.lease.current_holder()
        if holder != shard.other_holder and holder and holder != self.id:
            logger.info("standing by for vCenter %s: producer %s reads it", shard.url, holder)
        shard.other_holder = holder if holder != self.id else None
        shard.metrics.holder = shard.other_holder

    def _take(self, shard: Shard) -> bool:
        if not shard.lease.try_acquire():
            return False
        if shard.other_holder:
            logger.info("took over reading vCenter %s (from producer %s)", shard.url,
                        shard.other_holder)
        shard.other_holder = None
        shard.service = ProducerService(
            self.settings, self.app, shard.metrics, self.simulate, vcenter=shard.vcenter,
            lease=shard.lease, publisher=self.publisher, retry_first_login=not self.fail_fast)
        metrics = shard.metrics
        metrics.held, metrics.holder = True, self.id
        metrics.heartbeat = metrics.started = time.time()
        metrics.last_poll_at = metrics.caught_up_at = metrics.last_poll_error = None
        metrics.stall = None
        shard.thread = threading.Thread(target=self._read, args=(shard,),
                                        name=f"vebaq-{shard.label}", daemon=True)
        shard.thread.start()
        return True

    def _read(self, shard: Shard) -> None:
        """A vCenter's thread."""
        label_thread(None if len(self.shards) == 1 else shard.label)
        try:
            shard.service.read()
        except BaseException as exc:  # noqa: BLE001 - handed to the supervisor in _reap
            shard.error = exc
            if self.fail_fast:
                return  # the supervisor raises it in the main thread
            if isinstance(exc, VebaqError):
                logger.error("reading stopped: %s; retrying in %.0fs", exc, FAILURE_COOLDOWN)
            else:
                logger.exception("reading stopped by an unexpected error; retrying in %.0fs",
                                 FAILURE_COOLDOWN)

    def _hand_over(self, shard: Shard) -> None:
        logger.info("%d producers share %d vCenters, %d each at most: handing vCenter %s over "
                    "after the batch in hand", self.live, len(self.shards), self.share, shard.url)
        shard.handing_over = True
        shard.service.stop.set()

    def _reap(self) -> None:
        """Release the leases of loops that ended, and say why they did."""
        now = time.monotonic()
        for shard in self.shards:
            if shard.thread is None or shard.thread.is_alive():
                continue
            shard.thread.join()
            shard.thread, shard.service = None, None
            lost = not shard.lease.held.is_set()
            shard.lease.release()
            shard.metrics.held = False
            shard.metrics.holder = None
            error, shard.error = shard.error, None
            if error is not None:
                if self.fail_fast:
                    self._fatal = error
                    return
                shard.cooldown_until = now + FAILURE_COOLDOWN
            elif shard.handing_over:
                logger.info("handed vCenter %s over: checkpoint committed, lease released",
                            shard.url)
                shard.cooldown_until = now + HANDOVER_COOLDOWN
            elif lost:
                logger.info("vCenter %s: lease lost; standing by", shard.url)
            shard.handing_over = False

    def state(self) -> dict:
        """This producer's record for ``vebaq status`` (see :mod:`producer.membership`)."""
        reading = {}
        for shard in self.shards:
            if not shard.running:
                continue
            m = shard.metrics
            lag = m.lag
            reading[shard.url] = {
                "scope": shard.lease.scope, "state": m.state(), "connected": m.connected,
                "instance_uuid": m.instance_uuid, "checkpoint_key": m.checkpoint_key,
                "lag_seconds": None if lag is None else round(lag, 3),
                "last_poll": m.last_poll_at}
        return {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self.started, "configured": len(self.shards), "share": self.share,
                "live_producers": self.live, "vcenters": reading}

    def shutdown(self) -> None:
        """Stop every loop after its batch, release the leases, leave the producers."""
        self.stop.set()
        running = [s for s in self.shards if s.running]
        for shard in running:
            shard.service.stop.set()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for shard in running:
            shard.thread.join(max(0.0, deadline - time.monotonic()))
        for shard in running:
            if shard.thread.is_alive():
                logger.warning("vCenter %s: still in a call after %.0fs; its lease expires by "
                               "itself", shard.url, SHUTDOWN_GRACE)
            else:
                shard.lease.release()
                shard.metrics.held = False
        with contextlib.suppress(redis.RedisError):  # else the heartbeat goes stale by itself
            self.membership.leave()
        if self._fatal is None:  # else its one line says it all
            logger.info("producer stopped")
