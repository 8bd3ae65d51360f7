"""The producer loop: read new vCenter events, convert, enqueue, then advance the checkpoint."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from pyVmomi import vim

from producer import unconverted
from producer.checkpoint import OVERLAP, CheckpointStore, LeaseLost
from producer.cloudevent import MalformedEvent, subject_of, to_cloudevent
from producer.lease import Lease
from producer.metrics import ProducerMetrics
from producer.reader import EventReader, SeenKeys
from producer.vcenter import CONNECTION_LOST, SESSION_LOST, Session, connect
from vebaq.core import deadletters, progress
from vebaq.core.broker import sender_app
from vebaq.core.config import Settings
from vebaq.core.envelope import to_structured
from vebaq.core.errors import BrokerError, VCenterError
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from vebaq.core.redisdb import check as check_redis
from vebaq.core.redisdb import client, explain_redis_error, out_of_memory
from vebaq.core.routing import route
from vebaq.core.secrets import redact_url, scrub

logger = logging.getLogger("vebaq.producer")

#: Longest wait between attempts to reach vCenter or Redis again.
MAX_RECONNECT_DELAY = 30.0


@dataclass(frozen=True)
class ReadEvent:
    """An event read from vCenter and converted, waiting to be enqueued.

    :param key: the vCenter event key; :param created: its creation time;
    :param messages: the task messages to send, one per matching pool (none: no trigger
        matched, the event only moves the checkpoint).
    """

    key: int
    created: datetime
    messages: tuple[TaskMessage, ...]

#: Errors that mean "Redis did not take the batch": keep it and try again.
BROKER_ERRORS = (OperationalError, KombuError, redis.RedisError, ConnectionError, OSError)
#: Errors that come from Redis only (not from vCenter's sockets).
REDIS_ERRORS = (OperationalError, KombuError, redis.RedisError)


#: Polls stay at the poll interval until no event came for this many seconds; only then do
#: they back off (doubling up to ``vcenter.maxPollInterval``), so latency stays at the poll
#: interval while events flow and a quiet vCenter is polled less.
QUIET_BEFORE_BACKOFF = 30.0

#: Seconds behind vCenter above which the producer reports its catch-up progress.
CATCH_UP_LAG = 30.0


class CatchUp:
    """Progress through a backlog (after an outage, or a first start with an old checkpoint),
    measured in vCenter time: a log line every ``vebaq.core.progress.LOG_INTERVAL`` seconds."""

    def __init__(self) -> None:
        self.origin: datetime | None = None  # creation time of the first backlog event
        self.events = 0
        self.started = 0.0
        self.shown = 0.0

    def update(self, newest: datetime, events: int) -> None:
        now = datetime.now(UTC)
        behind = (now - newest).total_seconds()
        if self.origin is None:
            if behind < CATCH_UP_LAG:
                return
            self.origin, self.events, self.started = newest, 0, time.monotonic()
            self.shown = self.started
        self.events += events
        elapsed = max(time.monotonic() - self.started, 1e-6)
        if behind < CATCH_UP_LAG:
            logger.info("caught up: %d backlog event(s) in %.0fs", self.events, elapsed)
            self.origin = None
            return
        if time.monotonic() - self.shown >= progress.LOG_INTERVAL:
            self.shown = time.monotonic()
            span = max((now - self.origin).total_seconds(), 1e-6)
            done = (newest - self.origin).total_seconds() / span
            logger.info("catching up: %s — %d event(s), %.0f/s, %.0fs behind vCenter",
                        progress.bar(done), self.events, self.events / elapsed, behind)


class ProducerService:
    """Runs until :attr:`stop` is set.

    :param settings: the loaded configuration.
    :param app: the Celery app to publish with (a sender app for the settings by default).
    :param simulate: read the built-in simulated source instead of vCenter, with these
        :class:`~producer.simulated.SimulatedReader` options (``rate``, ``backlog``, ``hosts``).
    """

    def __init__(self, settings: Settings, app: Celery | None = None,
                 metrics: ProducerMetrics | None = None,
                 simulate: dict | None = None) -> None:
        self.settings = settings
        self.simulate = simulate
        self.app = app or sender_app(settings, "vebaq-producer")
        self.metrics = metrics or ProducerMetrics()
        self.stop = threading.Event()
        self.redis = client(settings.broker_url)
        self.publisher = Publisher(self.app)
        self.metrics.watch_queues(self.redis, {t.pool for t in settings.triggers})
        self.lease = Lease(self.redis, settings.vcenter.url if simulate is None else "simulated")
        self.session: Session | None = None
        self.reader: EventReader | None = None
        self.store: CheckpointStore | None = None
        #: Bumped when vCenter numbers its events anew (see producer.cloudevent.event_id).
        self.key_epoch = 0
        self.catch_up = CatchUp()

    # --- start-up: every failure here is one clear line and a non-zero exit

    def check_broker(self) -> None:
        check_redis(self.settings.broker_url, self.settings.secrets())

    def wait_for_lease(self) -> bool:
        """Stand by until this producer holds the lease for its vCenter; False if stopped."""
        if self.lease.try_acquire():
            return True
        logger.info("standing by: producer %s is reading this vCenter", self.lease.current_holder())
        self.metrics.standing_by = True
        try:
            while not self.stop.wait(self.lease.ttl / 4):
                self.metrics.heartbeat = time.time()
                if self.lease.try_acquire():
                    logger.info("took over reading this vCenter")
                    return True
            return False
        finally:
            self.metrics.standing_by = False

    def start(self) -> None:
        vc = self.settings.vcenter
        if self.simulate is not None:
            from producer.simulated import SimulatedSession

            self.session = SimulatedSession()
        else:
            self.session = connect(vc)
        self.metrics.connected = True
        self.store = CheckpointStore(self.redis, self.session.instance_uuid, vc.checkpoint_max_age)
        begin, floor, checkpoint = self.store.resume_from(self.session.now())
        seen = SeenKeys(self.store.published_since(begin))
        if self.simulate is not None:
            from producer.simulated import SimulatedReader

            self.reader = SimulatedReader(begin=begin, floor=floor, seen=seen, **self.simulate)
        else:
            self.reader = EventReader(self.session.content, begin=begin, floor=floor, seen=seen,
                                      page_size=vc.page_size,
                                      latest_page_fallback=vc.latest_page_fallback)
        self.reader.open()
        self.key_epoch = self.store.key_epoch()
        self._check_key_regression(checkpoint.key if checkpoint else None)
        self.publisher.declare({t.pool for t in self.settings.triggers})
        where = (f"checkpoint: event {checkpoint.key} of {checkpoint.created.isoformat()}"
                 if checkpoint else "no checkpoint: new events only")
        logger.info("reading vCenter %s (instance %s) from %s (%s); enqueueing to %s",
                    self.session.url, self.session.instance_uuid, begin.isoformat(), where,
                    redact_url(self.settings.broker_url))

    def _check_key_regression(self, last_key: int | None) -> None:
        """A vCenter restored from a backup (or a restarted simulator) numbers its events anew:
        if its newest key is below our last one, forget the published keys, or new events that
        reuse old keys would be skipped as already published."""
        collector = getattr(self.reader, "collector", None)
        if last_key is None or collector is None:
            return
        newest = max((e.key for e in collector.latestPage or ()), default=None)
        if newest is not None and newest < last_key:
            logger.warning("vCenter's newest event key %d is below the checkpoint's %d "
                           "(vCenter restored or reset?): reading on by time, forgetting keys",
                           newest, last_key)
            self.reader.seen = SeenKeys()
            self.key_epoch = self.store.start_new_key_epoch()

    # --- the loop

    def run(self) -> None:
        """Take the lease, start, poll; stand by again if the lease is lost; until stopped."""
        self.check_broker()
        try:
            while not self.stop.is_set():
                try:
                    if not self.wait_for_lease():
                        break
                    polling = False
                    try:
                        self.start()
                        polling = True
                        self._poll_until_stopped_or_lease_lost()
                    finally:
                        self.shutdown(quiet=not polling)
                except REDIS_ERRORS as exc:  # taking the lease or starting: nothing to keep
                    detail = self._explain(exc)
                    raise BrokerError(detail if out_of_memory(exc) else
                                      f"Redis at {redact_url(self.settings.broker_url)}: "
                                      f"{detail}") from None
        finally:
            self.lease.release()

    def _explain(self, error: BaseException) -> str:
        return scrub(explain_redis_error(error, self.redis), self.settings.secrets())

    def _poll_until_stopped_or_lease_lost(self) -> None:
        vc = self.settings.vcenter
        interval = vc.poll_interval
        last_event = time.monotonic()
        pending: list[ReadEvent] = []
        while not self.stop.is_set():
            self.metrics.heartbeat = time.time()
            if not self.lease.held.is_set():
                logger.warning("lease lost: %d unpublished event(s) left for the new holder",
                               len(pending))
                return
            if not pending:
                try:
                    events = self.reader.poll()
                except SESSION_LOST + CONNECTION_LOST as exc:
                    self._reconnect(exc)
                    continue
                self.metrics.events_read.inc(len(events))
                pending = self._convert(events)
                if events:
                    last_event = time.monotonic()
            if pending:
                if self._publish(pending):
                    pending = []
                    if self.reader.more_waiting:
                        continue  # a backlog drains without waiting
                    interval = vc.poll_interval
                else:
                    interval = min(max(interval * 2, 1.0), MAX_RECONNECT_DELAY)
            elif time.monotonic() - last_event < QUIET_BEFORE_BACKOFF:
                interval = vc.poll_interval
            else:
                interval = min(interval * 2, vc.max_poll_interval)
            self.stop.wait(interval)

    def _convert(self, events: list[vim.event.Event]) -> list[ReadEvent]:
        converted = []
        for event in events:
            try:
                cloudevent = to_cloudevent(
                    event, source=self.session.url, instance_uuid=self.session.instance_uuid,
                    api_version=self.session.api_version, type_style=self.settings.cloudevent_type,
                    key_epoch=self.key_epoch)
                structured = to_structured(cloudevent)
            except (MalformedEvent, ValueError, TypeError) as exc:
                self._dead_letter_malformed(event, exc)
                continue
            messages = tuple(TaskMessage(structured["subject"], structured, pool)
                             for pool in route(self.settings.triggers, structured))
            converted.append(ReadEvent(event.key, cloudevent.get_time(), messages))
        return converted

    def _dead_letter_malformed(self, event: vim.event.Event, exc: Exception) -> None:
        """Dead-letter an event that cannot be converted, replayably (see
        :mod:`producer.unconverted`)."""
        self.metrics.malformed.inc()
        kept = unconverted.dead_letter_event(
            event, source=self.session.url, instance_uuid=self.session.instance_uuid,
            api_version=self.session.api_version, key_epoch=self.key_epoch)
        letter = deadletters.add(self.redis, task_name=subject_of(event), pool=None,
                                 function=unconverted.FUNCTION, event=kept, error=exc, attempt=1)
        logger.error("cannot convert %s (key %r): %s; dead letter %s%s", subject_of(event),
                     getattr(event, "key", None), exc, letter,
                     f" (not replayable: {kept['notReplayable']})" if "notReplayable" in kept
                     else " (`vebaq dlq replay` converts it again)")

    def _publish(self, pending: list[ReadEvent]) -> bool:
        """Enqueue, then commit the checkpoint; False (batch kept) if Redis failed."""
        batch = [message for item in pending for message in item.messages]
        try:
            self.publisher.publish(batch)
            checkpoint = self.store.commit([(item.key, item.created) for item in pending],
                                           self.reader.floor, fence=self.lease)
        except LeaseLost:
            logger.error("lease lost while publishing: checkpoint left to the new holder")
            self.lease.held.clear()
            return False
        except BROKER_ERRORS as exc:
            self.metrics.publish_errors.inc()
            logger.error("Redis did not take %d event(s), keeping them and retrying: %s",
                         len(pending), self._explain(exc))
            return False
        for message in batch:
            self.metrics.published.labels(pool=message.pool).inc()
        self.reader.confirmed([item.key for item in pending], checkpoint.created - OVERLAP)
        self.metrics.checkpoint_time.set(checkpoint.updated)
        self.metrics.read_lag.set(max(0.0, time.time() - checkpoint.created.timestamp()))
        self.catch_up.update(checkpoint.created, len(pending))
        logger.info("enqueued %d event(s) (keys %d–%d) → %d task(s); checkpoint at event %d",
                    len(pending), pending[0].key, pending[-1].key, len(batch), checkpoint.key)
        return True

    def _reconnect(self, cause: BaseException) -> None:
        """Log in again and recreate the collector, from the checkpoint (never skipping)."""
        self.metrics.connected = False
        logger.warning("vCenter session lost (%s); logging in again", type(cause).__name__)
        if self.session is not None:
            self.session.close()
        delay = 1.0
        while not self.stop.is_set():
            try:
                self.session = connect(self.settings.vcenter)
                break
            except VCenterError as exc:
                logger.error("%s; retrying in %.0fs", exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
        else:
            return
        self.metrics.reconnects.inc()
        self.metrics.connected = True
        self.reader.content = self.session.content
        self.reader.collector = self.reader.window = None  # they died with their session
        self.reader.open()
        checkpoint = self.store.load()
        self._check_key_regression(checkpoint.key if checkpoint else None)
        logger.info("vCenter session restored; reading on from %s", self.reader.begin.isoformat())

    def shutdown(self, quiet: bool = False) -> None:
        """Close the reader and the session; ``quiet``: a start that failed, which its error
        line says alone."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.session is not None:
            self.session.close()
            self.session = None
        if not quiet:
            logger.info("producer stopped")
