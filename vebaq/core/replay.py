"""Replaying archived events (``vebaq replay``): a time range of the archive sent to the pools
again, for a fixed function or a new one.

The events are read from the archive (:mod:`vebaq.core.archive`) in their original order (per
vCenter the order they were enqueued in, several vCenters merged by creation time) and
re-enqueued in batches of :data:`BATCH`, each to the pools the triggers route it to *today* (a
trigger added since routes old events too), or to the one pool asked for. Each replayed task:

* carries the same CloudEvent — same ``id`` — with two extensions, ``replayed`` (``true``) and
  ``replayedat`` (when the replay started, RFC 3339), so functions and Flower can tell a replay
  from the original;
* has its own task id, ``<event id>:<pool>:replay-<token>``, one token per replay;
* by default runs only the functions that have not run for the event yet: done markers still
  suppress what was done (the replay does not even send a task whose functions all ran); with
  ``force`` the token goes along and the functions run again once (:mod:`vebaq.core.done`),
  for a function that was fixed.

Stopping (``stop``, set by Ctrl-C) takes effect between two batches: a batch is enqueued whole
or not at all, and the summary names the first event not replayed, to resume from.

It uses the archive, the routing and the publisher only; what functions a pool has comes from the
caller (:class:`Handler`), so this module depends on neither the producer nor the workers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis

from vebaq.core import keys
from vebaq.core.archive import Archive, ArchivedEvent
from vebaq.core.config import parse_duration
from vebaq.core.errors import BadOption, ConfigError
from vebaq.core.messages import TaskMessage
from vebaq.core.progress import Progress
from vebaq.core.publish import Publisher
from vebaq.core.routing import Trigger, route

#: Events enqueued per batch (one pipelined publish; Ctrl-C waits for at most one).
BATCH = 500
#: The extensions marking a replayed event (CloudEvents extension names: lowercase a–z, 0–9).
REPLAYED, REPLAYED_AT = "replayed", "replayedat"


class BadTime(BadOption):
    """A ``--since``/``--until`` that is neither a duration nor an RFC 3339 time."""


def parse_moment(text: str, now: datetime, option: str) -> datetime:
    """A duration back from ``now`` (``2h``, ``30m``, ``7d``, ``PT15M``) or an RFC 3339 time
    (``2025-06-03T14:00:00Z``, ``…+02:00``); ``now`` itself for ``now``."""
    text = text.strip()
    if text.lower() == "now":
        return now
    try:
        return now - timedelta(seconds=parse_duration(text, option))
    except ConfigError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadTime(f"{option}: expected a duration such as 2h or 7d, or an RFC 3339 time such "
                      f"as 2025-06-03T14:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        raise BadTime(f"{option}: {text!r} has no time zone: add Z (UTC) or an offset such as "
                      f"+02:00")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class Handler:
    """A function of a pool, as the replay sees it: its name and the subjects it handles
    (``None``: every subject)."""

    name: str
    subjects: frozenset[str] | None = None

    def handles(self, subject: str) -> bool:
        return self.subjects is None or subject in self.subjects


@dataclass(frozen=True)
class Request:
    """What to replay, and where to.

    :param since: only events created at or after this; :param until: … and at or before this.
    :param subjects: only these subjects (``None``: all).
    :param instance_uuids: the vCenters whose archives to read.
    :param triggers: today's triggers; :param pools: pool → its functions.
    :param pool: send to this pool instead of where the triggers route.
    :param function: run only this function.
    :param force: run functions again even if they already ran for the event.
    """

    since: datetime
    until: datetime | None
    instance_uuids: tuple[str, ...]
    triggers: tuple[Trigger, ...]
    pools: Mapping[str, Sequence[Handler]]
    subjects: tuple[str, ...] | None = None
    pool: str | None = None
    function: str | None = None
    force: bool = False


@dataclass
class Summary:
    """What a replay did (or, dry, would do)."""

    token: str
    #: Archived events in the time range with the subjects asked for.
    matched: int = 0
    #: Events enqueued again (to one pool or more), and the tasks that took.
    enqueued: int = 0
    tasks: int = 0
    #: Events not sent because every function they would run had already run for them.
    already_done: int = 0
    #: Events not sent because no trigger routes them (or the pool or function asked for does
    #: not handle their subject).
    not_routed: int = 0
    #: Set when stopped early: the first event not replayed.
    stopped_at: ArchivedEvent | None = None
    #: Tasks per pool.
    per_pool: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.already_done + self.not_routed


@dataclass(frozen=True)
class _Send:
    item: ArchivedEvent
    #: (pool, names of the functions that would run there)
    targets: tuple[tuple[str, tuple[str, ...]], ...]


def _targets(request: Request, item: ArchivedEvent) -> tuple[tuple[str, tuple[str, ...]], ...]:
    pools = [request.pool] if request.pool else route(request.triggers, item.event)
    chosen = []
    for pool in pools:
        names = tuple(h.name for h in request.pools.get(pool, ()) if h.handles(item.subject)
                      and (request.function is None or h.name == request.function))
        if names:  # a pool without a function for the subject would only run nothing
            chosen.append((pool, names))
    return tuple(chosen)


def _not_done(r: redis.Redis, sends: list[_Send]) -> list[_Send]:
    """The sends with the pools and functions that have not run yet (one round trip)."""
    pipe = r.pipeline(transaction=False)
    for send in sends:
        for pool, names in send.targets:
            for name in names:
                pipe.exists(keys.done(pool, name, str(send.item.event.get("id"))))
    answers = iter(pipe.execute())
    remaining = []
    for send in sends:
        targets = []
        for pool, names in send.targets:
            todo = tuple(name for name in names if not next(answers))
            if todo:
                targets.append((pool, todo))
        remaining.append(_Send(send.item, tuple(targets)))
    return remaining


def run(archive: Archive, publisher: Publisher | None, request: Request, *,
        stop: threading.Event | None = None, progress: Progress | None = None,
        batch: int = BATCH, now: datetime | None = None) -> Summary:
    """Replay ``request``; ``publisher=None`` is a dry run (nothing sent, the summary says what
    would be)."""
    token = uuid.uuid4().hex[:12]
    started = now or datetime.now(UTC)
    marks = {REPLAYED: True, REPLAYED_AT: started.isoformat().replace("+00:00", "Z")}
    summary = Summary(token)
    span = max(((request.until or started) - request.since).total_seconds(), 1e-6)
    stop = stop or threading.Event()

    def flush(sends: list[_Send]) -> None:
        """Resolve and enqueue one batch: all of it, or (an exception) none of it counted."""
        routed = [s for s in sends if s.targets]
        if not request.force:
            routed = _not_done(archive.redis, routed)
        messages, per_pool, enqueued, done = [], {}, 0, 0
        for send in routed:
            if not send.targets:
                done += 1
                continue
            event = {**send.item.event, **marks}
            enqueued += 1
            for pool, names in send.targets:
                messages.append(TaskMessage(
                    send.item.subject or str(event.get("subject")), event, pool,
                    functions=names if request.function else None, id_suffix=f"replay-{token}",
                    force=token if request.force else None))
                per_pool[pool] = per_pool.get(pool, 0) + 1
        if publisher is not None:
            publisher.publish(messages)
        summary.matched += len(sends)
        summary.not_routed += len(sends) - len(routed)
        summary.already_done += done
        summary.enqueued += enqueued
        summary.tasks += len(messages)
        for pool, count in per_pool.items():
            summary.per_pool[pool] = summary.per_pool.get(pool, 0) + count

    pending: list[_Send] = []
    sendable = 0
    for item in archive.read_all(request.instance_uuids, request.since, request.until,
                                 request.subjects):
        if stop.is_set():
            summary.stopped_at = pending[0].item if pending else item
            break
        targets = _targets(request, item)
        pending.append(_Send(item, targets))
        sendable += bool(targets)
        # a batch is BATCH events to send; events not routed are bounded too (memory)
        if sendable >= batch or len(pending) >= 10 * batch:
            flush(pending)
            pending, sendable = [], 0
            if progress is not None:
                progress.update(summary.enqueued, _fraction(item, request.since, span))
    else:
        if pending and stop.is_set():
            summary.stopped_at = pending[0].item
        elif pending:
            flush(pending)
    if progress is not None:
        fraction = 1.0 if summary.stopped_at is None else \
            _fraction(summary.stopped_at, request.since, span)
        progress.finish(summary.enqueued, fraction)
    return summary


def _fraction(item: ArchivedEvent, since: datetime, span: float) -> float:
    return (item.created - since).total_seconds() / span


def resolve_sources(archive: Archive, sources: Iterable[str] | None) -> tuple[str, ...]:
    """The instance UUIDs of the archives to read: all, or those of the given source URLs (or
    UUIDs); raises :class:`BadOption` naming the known sources for an unknown one."""
    known = archive.sources()
    if not sources:
        return tuple(sorted(known))
    chosen = []
    for source in sources:
        matches = [uuid_ for uuid_, url in known.items() if source in (url, uuid_)]
        if not matches:
            listed = ", ".join(sorted(set(known.values()))) or "none: the archive is empty"
            raise BadOption(f"--source: no archive of {source!r} (archived sources: {listed})")
        chosen += matches
    return tuple(sorted(set(chosen)))


def describe(summary: Summary, dry_run: bool = False) -> str:
    """The one-paragraph summary printed at the end."""
    verb = "would enqueue" if dry_run else "enqueued"
    pools = ", ".join(f"{pool}: {n}" for pool, n in sorted(summary.per_pool.items()))
    text = (f"matched {summary.matched} event(s); {verb} {summary.enqueued} "
            f"({summary.tasks} task(s){': ' + pools if pools else ''}); skipped "
            f"{summary.skipped} ({summary.already_done} already done, {summary.not_routed} "
            f"not routed to a function)")
    if not dry_run and summary.tasks:
        text += f"; task ids end in :replay-{summary.token}"
    if summary.stopped_at is not None:
        item = summary.stopped_at
        when = item.created.isoformat().replace("+00:00", "Z")
        text += (f"\nstopped before event {item.event.get('id')} ({item.subject}, {when}); "
                 f"resume with --since {when}")
    return text
