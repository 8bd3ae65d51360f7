"""The producer loop: read new vCenter events, convert, route (throttled triggers decide in
Redis), enqueue, archive, then advance the checkpoint (the archive's guarantee is in
:mod:`vebaq.core.archive`, the throttles' in :mod:`vebaq.core.throttle`). The collector asks
vCenter only for events some trigger may match (:mod:`producer.pushdown`).

A :class:`ProducerService` reads one vCenter while its lease is held; the
:mod:`producer.supervisor` takes the leases and runs one service per vCenter in a thread of its
own, so that a vCenter that is down, slow or hung holds up only its own thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from pyVmomi import vim

from producer import unconverted
from producer.checkpoint import OVERLAP, CheckpointStore, LeaseLost
from producer.cloudevent import MalformedEvent, subject_of, to_cloudevent
from producer.lease import Lease, vcenter_scope
from producer.metrics import ProducerMetrics, VCenterMetrics
from producer.notifications import ChangeNotifier
from producer.pushdown import pushdown_for
from producer.reader import EventReader, SeenKeys
from producer.simulated import SIMULATED_URL, SimulatedReader, SimulatedSession
from producer.vcenter import CONNECTION_LOST, SESSION_LOST, Session, connect
from vebaq.core import deadletters, keys, progress, replication
from vebaq.core.archive import HIGH_WATER, Archive
from vebaq.core.broker import sender_app
from vebaq.core.config import Settings, VCenterSettings
from vebaq.core.envelope import to_structured
from vebaq.core.errors import BrokerError, LoginRefused, VCenterError, one_line
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from vebaq.core.redisdb import check as check_redis
from vebaq.core.redisdb import client, explain_redis_error, out_of_memory
from vebaq.core.routing import matching
from vebaq.core.secrets import redact_url, scrub
from vebaq.core.throttle import BATCHED, DROP, FIRED, PASS, Batch, Candidate, ThrottleStore

logger = logging.getLogger("vebaq.producer")

#: Longest wait between attempts to reach vCenter or Redis again.
MAX_RECONNECT_DELAY = 30.0

#: Shortest wait before logging in again after vCenter refused the user name or password: SSO's
#: default lockout policy locks an account after 5 failed logins within 3 minutes.
LOGIN_REFUSED_DELAY = 120.0


@dataclass(frozen=True)
class ReadEvent:
    """An event read from vCenter and converted, waiting to be enqueued.

    :param key: the vCenter event key; :param created: its creation time;
    :param messages: the task messages to send, one per matching pool (none: no trigger
        matched, the event is archived and moves the checkpoint);
    :param event: the structured CloudEvent.
    :param candidates: matches of throttled triggers whose pool has no message yet: sent or
        not as the throttle decides when the batch is published.
    """

    key: int
    created: datetime
    messages: tuple[TaskMessage, ...]
    event: dict | None = None
    candidates: tuple[Candidate, ...] = ()

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

#: Seconds between two warnings that the archive is shedding or skipping events (each is
#: counted in the metrics).
ARCHIVE_WARNING_INTERVAL = 60.0

#: Seconds between two INFO lines per trigger about the events its throttle suppressed (each is
#: counted in ``vebaq_producer_throttled_total``).
THROTTLE_LOG_INTERVAL = 60.0

#: Seconds between two checks for batches whose ``within`` ran out.
BATCH_FLUSH_INTERVAL = 1.0


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
    """Reads one vCenter while its lease is held, until :attr:`stop` is set.

    :param settings: the loaded configuration.
    :param app: the Celery app to publish with (a sender app for the settings by default).
    :param metrics: this vCenter's metrics (of a process-wide
        :class:`~producer.metrics.ProducerMetrics`; a registry of its own by default).
    :param simulate: read the built-in simulated source instead of vCenter, with these
        :class:`~producer.simulated.SimulatedReader` options (``rate``, ``backlog``, ``hosts``).
    :param vcenter: which vCenter (the first configured by default).
    :param lease: its lease, acquired by the caller (a new one, not acquired, by default).
    :param retry_first_login: keep trying the first login, as every later one (a process reading
        several vCenters); else a failed first login raises its one-line error.
    """

    def __init__(self, settings: Settings, app: Celery | None = None,
                 metrics: VCenterMetrics | None = None,
                 simulate: dict | None = None, *, vcenter: VCenterSettings | None = None,
                 lease: Lease | None = None, publisher: Publisher | None = None,
                 retry_first_login: bool = False) -> None:
        self.settings = settings
        self.simulate = simulate
        self.vcenter = vc = vcenter or settings.vcenter
        self.app = app or sender_app(settings, "vebaq-producer")
        self.metrics = metrics or ProducerMetrics().vcenter(
            SIMULATED_URL if simulate is not None else vc.url or "")
        # A few polls at the slowest interval, or one SOAP timeout, before /healthz complains.
        self.metrics.poll_stale_after = max(3 * vc.max_poll_interval, vc.request_timeout + 5)
        self.stop = threading.Event()
        self.retry_first_login = retry_first_login
        self.redis = client(settings.broker_url)
        self.publisher = publisher or Publisher(self.app)
        self.archive = Archive(self.redis, settings.archive) if settings.archive.enabled else None
        self._archive_warned = 0.0
        self.lease = lease or Lease(self.redis, vcenter_scope(None if simulate is not None
                                                              else vc.url))
        self.session: Session | SimulatedSession | None = None
        self.reader: EventReader | SimulatedReader | None = None
        self.notifier: ChangeNotifier | None = None
        self.store: CheckpointStore | None = None
        #: Bumped when vCenter numbers its events anew (see producer.cloudevent.event_id).
        self.key_epoch = 0
        self.catch_up = CatchUp()
        self.throttle: ThrottleStore | None = None
        self._batching = any(t.throttle is not None and t.throttle.mode == "batch"
                             for t in settings.triggers)
        self._batches_checked = 0.0
        #: trigger → [events suppressed since the last log line, when that line was logged]
        self._throttle_log: dict[str, list[float]] = {}

    def check_broker(self) -> None:
        """Redis answers and takes our password, else one line (:class:`BrokerError`)."""
        check_redis(self.settings.broker_url, self.settings.secrets())

    def read(self) -> None:
        """Log in and read until stopped or the lease is lost (the caller took the lease, and
        releases it afterwards). Redis failing while it starts is one line
        (:class:`~vebaq.core.errors.BrokerError`): there is nothing to keep yet."""
        polling = False
        try:
            self.start()
            if self.session is not None:
                polling = True
                self._poll_until_stopped_or_lease_lost()
        except REDIS_ERRORS as exc:
            if polling:
                raise
            detail = self._explain(exc)
            raise BrokerError(detail if out_of_memory(exc) else
                              f"Redis at {redact_url(self.settings.broker_url)}: "
                              f"{detail}") from None
        finally:
            self.shutdown(quiet=not polling)

    def start(self) -> None:
        vc = self.vcenter
        if self.simulate is not None:
            self.session = SimulatedSession()
        elif self.retry_first_login:
            self.session = self._login()
            if self.session is None:
                return  # stopped, or the lease lost, before vCenter let us in
        else:
            self.session = connect(vc)
        self.metrics.connected = True
        self._note_instance()
        self.store = CheckpointStore(self.redis, self.session.instance_uuid, vc.checkpoint_max_age)
        begin, floor, checkpoint = self.store.resume_from(self.session.now())
        seen = SeenKeys(self.store.published_since(begin))
        self.throttle = ThrottleStore(self.redis, self.session.instance_uuid)
        if self.simulate is not None:
            self.reader = SimulatedReader(begin=begin, floor=floor, seen=seen, **self.simulate)
        else:
            pushdown, why = pushdown_for(
                self.settings.triggers, source=self.session.url,
                instance_uuid=self.session.instance_uuid, type_style=self.settings.cloudevent_type)
            if not vc.pushdown:
                pushdown, why = None, "vcenter.pushdown is false"
            logger.info("pushdown: %s", f"vCenter sends only events with {why}" if pushdown
                        else f"none, reading every event ({why})")
            self.metrics.pushdown = why if pushdown else None
            self.reader = EventReader(self.session.content, begin=begin, floor=floor, seen=seen,
                                      page_size=vc.page_size, pushdown=pushdown)
        self.reader.open()
        self._start_notifier()
        self.key_epoch = self.store.key_epoch()
        self._check_key_regression(checkpoint.key if checkpoint else None)
        self.metrics.checkpoint_key = checkpoint.key if checkpoint else None
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
        if last_key is None:
            return
        newest = self.reader.newest_key()
        if newest is not None and newest < last_key:
            logger.warning("vCenter's newest event key %d is below the checkpoint's %d "
                           "(vCenter restored or reset?): reading on by time, forgetting keys",
                           newest, last_key)
            self.reader.seen = SeenKeys()
            self.key_epoch = self.store.start_new_key_epoch()

    # --- the loop

    def _note_instance(self) -> None:
        """Which instance UUID (whose checkpoint) this URL is, for ``vebaq status``."""
        self.metrics.instance_uuid = self.session.instance_uuid
        try:
            self.redis.hset(keys.VCENTER_INSTANCES, self.lease.scope, self.session.instance_uuid)
        except redis.RedisError as exc:
            logger.warning("cannot note the vCenter's instance UUID in Redis (%s)",
                           type(exc).__name__)

    def _explain(self, error: BaseException) -> str:
        return scrub(explain_redis_error(error, self.redis), self.settings.secrets())

    def _poll_until_stopped_or_lease_lost(self) -> None:
        vc = self.vcenter
        interval = vc.poll_interval
        last_event = time.monotonic()
        pending: list[ReadEvent] = []
        while not self.stop.is_set():
            self.metrics.heartbeat = time.time()
            if not self.lease.held.is_set():
                logger.warning("lease lost: %d unpublished event(s) left for the new holder",
                               len(pending))
                return
            self._send_due_batches()
            if not pending:
                polled_at = time.time()
                try:
                    events = self.reader.poll()
                except SESSION_LOST + CONNECTION_LOST as exc:
                    self.metrics.poll_failed(exc)
                    self._reconnect(exc)
                    continue
                self.metrics.polled(self.reader, len(events))
                if self.notifier is not None:
                    self.notifier.polled(found_new=bool(events))
                pending = self._convert(events)
                if events:
                    last_event = time.monotonic()
                elif not self.reader.more_waiting:
                    self.metrics.caught_up(polled_at)
            if pending:
                if self._publish(pending):
                    pending = []
                    if self.reader.more_waiting:
                        continue  # a backlog drains without waiting
                    self.metrics.caught_up(polled_at)
                    interval = vc.poll_interval
                else:
                    interval = min(max(interval * 2, 1.0), MAX_RECONNECT_DELAY)
            elif time.monotonic() - last_event < QUIET_BEFORE_BACKOFF:
                interval = vc.poll_interval
            else:
                interval = min(interval * 2, vc.max_poll_interval)
            if pending or self.notifier is None:
                self.stop.wait(interval)
                continue
            try:
                self.notifier.wait(interval, self.stop, known=self.reader.known,
                                   quiet_limit=vc.max_poll_interval)
            except SESSION_LOST + CONNECTION_LOST as exc:
                self.metrics.poll_failed(exc)
                self._reconnect(exc)

    def _convert(self, events: list[vim.event.Event]) -> list[ReadEvent]:
        converted = []
        for event in events:
            try:
                cloudevent = to_cloudevent(
                    event, source=self.session.url, instance_uuid=self.session.instance_uuid,
                    api_version=self.session.api_version, type_style=self.settings.cloudevent_type,
                    key_epoch=self.key_epoch)
                structured = to_structured(cloudevent, json_data=True)
            except (MalformedEvent, ValueError, TypeError) as exc:
                self._dead_letter_malformed(event, exc)
                continue
            created = cloudevent.get_time()
            pools: list[str] = []
            candidates: list[Candidate] = []
            for trigger in matching(self.settings.triggers, structured):
                if trigger.pool in pools:
                    continue
                if trigger.throttle is None:
                    pools.append(trigger.pool)
                elif all(c.trigger.pool != trigger.pool for c in candidates):
                    candidates.append(Candidate(trigger, structured,
                                                int(created.timestamp() * 1000)))
            messages = tuple(TaskMessage(structured["subject"], structured, pool)
                             for pool in pools)
            candidates = [c for c in candidates if c.trigger.pool not in pools]
            converted.append(ReadEvent(event.key, created, messages, structured,
                                       tuple(candidates)))
        return converted

    def _throttled(self, pending: list[ReadEvent]
                   ) -> tuple[list[TaskMessage], list[Batch], list[tuple[Candidate, str]]]:
        """Every task message of the batch once the throttles decided (in Redis, atomically and
        idempotently), every batch waiting to be sent, and the candidates held back with their
        decision (counted once the batch is published)."""
        candidates = [c for item in pending for c in item.candidates]
        decisions = iter(self.throttle.decide(candidates))
        messages: list[TaskMessage] = []
        held: list[tuple[Candidate, str]] = []
        for item in pending:
            messages.extend(item.messages)
            for candidate in item.candidates:
                decision = next(decisions)
                if decision == PASS:
                    messages.append(TaskMessage(item.event["subject"], item.event,
                                                candidate.trigger.pool))
                else:
                    held.append((candidate, decision))
        batches = self.throttle.firing() if self._batching else []
        messages.extend(self._batch_message(b) for b in batches)
        return messages, batches, held

    def _count_held(self, held: list[tuple[Candidate, str]], batches: list[Batch]) -> None:
        for candidate, decision in held:
            name = candidate.trigger.name
            if decision == DROP:
                self.metrics.throttled.labels(trigger=name).inc()
                self._log_throttled(candidate)
            elif decision in (BATCHED, FIRED):
                self.metrics.batched.labels(trigger=name).inc()
        for sent in batches:
            self.metrics.batches.labels(trigger=sent.trigger).inc()

    def _batch_message(self, batch: Batch) -> TaskMessage:
        event = batch.cloudevent()
        return TaskMessage(str(event.get("subject") or event["type"]), event, batch.pool)

    def _log_throttled(self, candidate: Candidate) -> None:
        """One INFO line per trigger and :data:`THROTTLE_LOG_INTERVAL` about what its throttle
        suppressed (each event is counted all the same)."""
        name = candidate.trigger.name
        state = self._throttle_log.setdefault(name, [0, 0.0])
        state[0] += 1
        if time.monotonic() - state[1] >= THROTTLE_LOG_INTERVAL:
            logger.info("throttle: trigger %r (%s) suppressed %d event(s) since its last line, "
                        "e.g. %s for key %s", name, candidate.trigger.throttle.describe(),
                        state[0], candidate.event.get("subject"), candidate.key)
            state[0], state[1] = 0, time.monotonic()

    def _send_due_batches(self) -> None:
        """Send the batches whose ``within`` ran out (and any a killed producer left), every
        :data:`BATCH_FLUSH_INTERVAL` at most; a Redis error leaves them for the next time."""
        if not self._batching or self.throttle is None or \
                time.monotonic() - self._batches_checked < BATCH_FLUSH_INTERVAL:
            return
        self._batches_checked = time.monotonic()
        try:
            self.throttle.flush_due(int(time.time() * 1000))
            batches = self.throttle.firing()
            if not batches:
                return
            self.publisher.publish([self._batch_message(b) for b in batches])
            self.throttle.settle((), batches)
        except BROKER_ERRORS as exc:
            logger.warning("throttle: could not send the batches due (%s); trying again",
                           self._explain(exc))
            return
        self._count_held([], batches)
        for batch in batches:
            self.metrics.published.labels(pool=batch.pool).inc()
        logger.info("throttle: sent %d batch(es) due: %s", len(batches),
                    ", ".join(f"{b.trigger} key {b.key} ({len(b.events)} event(s))"
                              for b in batches))

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
        """Enqueue, archive, then commit the checkpoint; False (batch kept) if Redis failed."""
        encoded: dict[int, str] = {}  # each event's JSON, from the publisher to the archive
        try:
            batch, batches, held = self._throttled(pending)
            self.publisher.publish(batch, encoded=encoded)
            self._archive(pending, encoded)
            checkpoint = self.store.commit([(item.key, item.created) for item in pending],
                                           self.reader.floor, fence=self.lease)
            # Only a checkpoint on a replica survives a failover: without replicas, no wait.
            replication.confirm(self.redis)
        except LeaseLost:
            logger.error("lease lost while publishing: checkpoint left to the new holder")
            self.lease.held.clear()
            return False
        except BROKER_ERRORS as exc:
            self.metrics.publish_errors.inc()
            logger.error("Redis did not take %d event(s), keeping them and retrying: %s",
                         len(pending), self._explain(exc))
            return False
        for pool, count in Counter(message.pool for message in batch).items():
            self.metrics.published.labels(pool=pool).inc(count)
        self._count_held(held, batches)
        self._settle(pending, batches)
        self.reader.confirmed([item.key for item in pending], checkpoint.created - OVERLAP)
        self.metrics.checkpoint_time.set(checkpoint.updated)
        self.metrics.checkpoint_key = checkpoint.key
        self.metrics.read_lag.set(max(0.0, time.time() - checkpoint.created.timestamp()))
        self.catch_up.update(checkpoint.created, len(pending))
        logger.info("enqueued %d event(s) (keys %d–%d) → %d task(s); checkpoint at event %d",
                    len(pending), pending[0].key, pending[-1].key, len(batch), checkpoint.key)
        return True

    def _archive(self, pending: list[ReadEvent], encoded: dict[int, str] | None = None) -> None:
        """Archive the enqueued batch. Connection errors propagate (the batch is kept and sent
        again, the archive skips what it already has); Redis refusing the append does not stop
        the checkpoint: the events are enqueued, only their copy is missing, which is said."""
        if self.archive is None:
            return
        events = [(item.event, item.created) for item in pending if item.event is not None]
        try:
            result = self.archive.append(self.session.instance_uuid, self.session.url, events,
                                         encoded=encoded)
        except redis.ResponseError as exc:
            self.metrics.archive_skipped.labels(reason="error").inc(len(events))
            logger.error("archive: %d enqueued event(s) not archived: Redis refused: %s",
                         len(events), scrub(str(exc), self.settings.secrets()))
            return
        metrics = self.metrics
        metrics.archived.inc(result.added)
        metrics.archive_duplicates.inc(result.duplicates)
        metrics.archive_shed.inc(result.shed)
        if result.out_of_memory:
            metrics.archive_skipped.labels(reason="oom").inc(len(events))
        elif result.skipped:
            metrics.archive_skipped.labels(reason="memory").inc(result.skipped)
        if result.duplicates:
            logger.info("archive: %d event(s) of a batch sent again were archived already",
                        result.duplicates)
        if (result.shed or result.skipped or result.out_of_memory) and \
                time.monotonic() - self._archive_warned >= ARCHIVE_WARNING_INTERVAL:
            self._archive_warned = time.monotonic()
            full = f"above {HIGH_WATER:.0%} of maxmemory"
            if result.out_of_memory or result.skipped:
                logger.warning("archive: Redis is %s: %d enqueued event(s) not archived "
                               "(counted in vebaq_producer_archive_skipped_total)",
                               "out of memory" if result.out_of_memory else full, len(events))
            else:
                logger.warning("archive: Redis is %s: %d oldest archived event(s) dropped to "
                               "leave room for tasks", full, result.shed)

    def _settle(self, pending: list[ReadEvent], batches: list[Batch]) -> None:
        """The checkpoint moved past these events: the archive need not recognise them again,
        nor the throttles their decisions (failing is harmless: the ids expire)."""
        candidates = [c for item in pending for c in item.candidates]
        if candidates or batches:
            try:
                self.throttle.settle(candidates, batches)
            except BROKER_ERRORS as exc:
                logger.warning("throttle: could not settle a batch (%s)", type(exc).__name__)
        if self.archive is None:
            return
        try:
            self.archive.settle(self.session.instance_uuid,
                                [str(item.event.get("id")) for item in pending if item.event])
        except BROKER_ERRORS as exc:
            logger.warning("archive: could not settle a batch (%s)", type(exc).__name__)

    def _reconnect(self, cause: BaseException) -> None:
        """Log in again and recreate the collector, from the checkpoint (never skipping)."""
        self.metrics.connected = False
        logger.warning("vCenter session lost (%s: %s); logging in again", type(cause).__name__,
                       one_line(getattr(cause, "msg", None) or str(cause), width=200))
        if self.session is not None:
            # After a dropped connection the session lives on in vCenter, and so would its
            # collector: destroy it and log out (best effort, bounded by the request timeout).
            self.reader.close()
            if self.notifier is not None:
                self.notifier.close()
            self.session.close()
        session = self._login()
        if session is None:
            return
        self.session = session
        self.metrics.reconnects.inc()
        self.metrics.connected = True
        self.reader.reattach(self.session.content)
        self._start_notifier()
        checkpoint = self.store.load()
        self._check_key_regression(checkpoint.key if checkpoint else None)
        logger.info("vCenter session restored; reading on from %s", self.reader.begin.isoformat())

    def _login(self) -> Session | None:
        """Log in, retrying with back-off (refused passwords no sooner than
        :data:`LOGIN_REFUSED_DELAY`) until vCenter lets us in; ``None`` if stopped or the lease
        was lost meanwhile."""
        delay = 1.0
        attempt = 0
        while not self.stop.is_set() and self.lease.held.is_set():
            attempt += 1
            try:
                return connect(self.vcenter)
            except VCenterError as exc:
                self.metrics.poll_failed(exc)
                wait = max(delay, LOGIN_REFUSED_DELAY) if isinstance(exc, LoginRefused) else delay
                logger.error("login attempt %d failed: %s; retrying in %.0fs", attempt, exc,
                             wait)
                self._idle(wait)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
        return None

    def _idle(self, seconds: float) -> None:
        """Wait ``seconds`` (or until stopped), showing the loop alive meanwhile."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.metrics.heartbeat = time.time()
            self.stop.wait(min(left, 5.0))
        self.metrics.heartbeat = time.time()

    def _start_notifier(self) -> None:
        """Wait on vCenter's change notifications between polls (``vcenter.notifications``),
        unless an earlier session found that this vCenter sends none."""
        gave_up = self.notifier is not None and not self.notifier.working
        self.notifier = None
        if self.simulate is None and self.vcenter.notifications and not gave_up:
            self.notifier = ChangeNotifier(self.session.content)

    def shutdown(self, quiet: bool = False) -> None:
        """Close the notifier, the reader and the session; ``quiet``: a start that failed (or
        never logged in), which its error line says alone."""
        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.session is not None:
            self.session.close()
            self.session = None
        self.metrics.connected = False
        if not quiet:
            logger.info("stopped reading vCenter %s", self.vcenter.url)
