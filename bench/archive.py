"""The event archive: what archiving costs the producer, how fast a replay runs, and how many
bytes an archived event takes.

Three measurements on the built-in simulated source's events (its mix: maintenance mode, VM
power, logins), default settings and triggers (echo gets every event, vrops the maintenance
ones: 1.3 tasks per event):

``produce``  the producer's step per batch of 1,000 events with the archive — publish (one kombu
             batch), :meth:`~vebaq.core.archive.Archive.append`, the checkpoint transaction,
             :meth:`~vebaq.core.archive.Archive.settle` — against the same step without the
             archive (publish, checkpoint), in alternating order in every repeat.
``replay``   :func:`vebaq.core.replay.run` re-enqueueing every archived event (read in chunks,
             done-marker check, extensions, publish in batches of 500), against
             :meth:`~vebaq.core.publish.Publisher.publish` of the same task messages built
             beforehand — what any replay has to send.
``bytes``    ``MEMORY USAGE`` of the stream over its entries, against the events' JSON.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import events, redisdb
from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from producer.checkpoint import CheckpointStore
from producer.simulated import SIMULATED_URL, SIMULATED_UUID
from vebaq.core import config, keys
from vebaq.core.archive import Archive
from vebaq.core.broker import sender_app
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from vebaq.core.replay import REPLAYED, REPLAYED_AT, Handler, Request, run
from vebaq.core.routing import route
from workers.pools import POOLS, load_functions

#: Events per producer batch (a full page of vCenter's).
BATCH = 1000


def _batches(structured: list[dict[str, Any]], settings: config.Settings,
             start: datetime) -> list[list[tuple[dict[str, Any], datetime, list[TaskMessage]]]]:
    """The events a millisecond apart from ``start``, with their task messages, in batches."""
    items = []
    for i, event in enumerate(structured):
        created = start + timedelta(milliseconds=i)
        event = {**event, "time": created.isoformat().replace("+00:00", "Z")}
        messages = [TaskMessage(event["subject"], event, pool)
                    for pool in route(settings.triggers, event)]
        items.append((event, created, messages))
    return [items[i:i + BATCH] for i in range(0, len(items), BATCH)]


def _produce(publisher: Publisher, store: CheckpointStore, archive: Archive | None,
             batches: list) -> float:
    """Seconds for the producer's per-batch step over every batch."""
    started = time.perf_counter()
    for batch in batches:
        publisher.publish([m for _, _, messages in batch for m in messages])
        if archive is not None:
            archive.append(SIMULATED_UUID, SIMULATED_URL, [(e, c) for e, c, _ in batch])
        store.commit([(e["data"]["Key"], c) for e, c, _ in batch], batches[0][0][1])
        if archive is not None:
            archive.settle(SIMULATED_UUID, [e["id"] for e, _, _ in batch])
    return time.perf_counter() - started


def measure(profile: Profile, redis_url: str) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    settings = config.load(environ={"VEBAQ_BROKER_URL": redis_url},
                           known_pools=load_functions())
    app = sender_app(settings, "vebaq-bench-archive")
    publisher = Publisher(app)
    count = profile.archive_events
    start = datetime.now(UTC) - timedelta(hours=1)
    batches = _batches(events.simulated_cloudevents(count), settings, start)
    tasks = sum(len(m) for batch in batches for _, _, m in batch)
    handlers = {pool: [Handler(f.name, f.subjects) for f in functions]
                for pool, functions in POOLS.items()}
    with_archive, without, replays, baselines, sizes, json_sizes = [], [], [], [], [], []
    try:
        for repeat in range(profile.repeats):
            for archived in ((True, False) if repeat % 2 == 0 else (False, True)):
                redisdb.flush(r)
                store = CheckpointStore(r, SIMULATED_UUID, 3600)
                archive = Archive(r, settings.archive) if archived else None
                seconds = _produce(publisher, store, archive, batches)
                (with_archive if archived else without).append(count / seconds)
                if not archived:
                    continue
                stream = keys.archive(SIMULATED_UUID)
                sizes.append(r.memory_usage(stream, samples=0) / r.xlen(stream))
                json_sizes.append(sum(len(f[b"e"]) + len(f[b"s"])
                                      for _i, f in r.xrange(stream)) / r.xlen(stream))
                for pool in handlers:
                    r.delete(pool)
                began = time.perf_counter()
                summary_ = run(Archive(r, settings.archive), publisher, Request(
                    since=start, until=None, instance_uuids=(SIMULATED_UUID,),
                    triggers=settings.triggers, pools=handlers))
                replays.append(summary_.enqueued / (time.perf_counter() - began))
                if summary_.enqueued != count or summary_.tasks != tasks:
                    raise RuntimeError(f"replay sent {summary_.enqueued} events, "
                                       f"{summary_.tasks} tasks of {count}, {tasks}")
                marks = {REPLAYED: True, REPLAYED_AT: "2025-06-03T14:00:00Z"}
                prepared = [TaskMessage(m.subject, {**e, **marks}, m.pool,
                                        id_suffix="replay-bench")
                            for batch in batches for e, _, messages in batch for m in messages]
                for pool in handlers:
                    r.delete(pool)
                began = time.perf_counter()
                for i in range(0, len(prepared), 500):
                    publisher.publish(prepared[i:i + 500])
                baselines.append(count / (time.perf_counter() - began))
    finally:
        redisdb.flush(r)
        app.close()
    return {
        "events": count, "tasks": tasks,
        "produce_per_s": {"with_archive": summary(with_archive),
                          "without_archive": summary(without)},
        "ratio_with_to_without": paired_ratio(with_archive, without),
        "replay_events_per_s": summary(replays),
        "publish_only_events_per_s": summary(baselines),
        "ratio_replay_to_publish": paired_ratio(replays, baselines),
        "bytes_per_event": summary(sizes),
        "json_bytes_per_event": summary(json_sizes),
        "ratio_bytes_to_json": paired_ratio(sizes, json_sizes),
    }
