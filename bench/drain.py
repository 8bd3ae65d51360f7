"""Producer drain rate on the vCenter simulator (the test peer: govmomi's model, collectors that
page forward as vCenter's do): ``drain_events`` waiting events read, converted, routed, enqueued
to Redis (task-sent events on), archived and checkpointed, against pyvmomi only reading them.

Three ways of taking the same events off the simulator, in every repeat (their order rotates,
so drift on a noisy machine hits each alike):

``pyvmomi``   the baseline: one collector (the reader's filter), ``ReadNextEvents`` pages of
              1,000 until a short page; nothing else.
``reader``    :class:`producer.reader.EventReader` polling until it returns nothing (with its
              stall watchdog's ``latestEvent`` read after the last page), no conversion.
``pipeline``  what the producer does per batch — ``EventReader.poll`` then
              :meth:`ProducerService._convert` (``to_cloudevent``, ``to_structured``,
              ``route``) and :meth:`ProducerService._publish` (``Publisher`` batch, the archive
              append, then the ``CheckpointStore`` transaction) — until a poll returns nothing.

The reader and the pipeline run with the producer's default settings (``pageSize``, the
archive on, task-sent events on) and default triggers (echo gets every event, vrops the
maintenance ones); the baseline reads pages of 1,000, vCenter's maximum.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from celery import Celery
from pyVmomi import vim

from bench import events, redisdb
from bench.profiles import Profile
from bench.simulator import Client
from bench.stats import paired_ratio, summary
from producer.checkpoint import CheckpointStore
from producer.reader import MAX_PAGE_SIZE, EventReader, SeenKeys
from producer.service import ProducerService
from producer.vcenter import Session, connect
from vebaq.core import config
from vebaq.core.broker import sender_app
from workers.pools import load_functions


def settings_for(sim_url: str, redis_url: str) -> config.Settings:
    """The producer's default settings, for the simulator."""
    env = {"VEBAQ_BROKER_URL": redis_url, "VCENTER_URL": sim_url,
           "VCENTER_USER": "vebaq-bench", "VCENTER_PASSWORD": "bench-password"}
    return config.load(environ=env, known_pools=load_functions())


def fill_simulator(sim_url: str, count: int) -> datetime:
    """Post ``count`` events; returns a time just before them (the simulator keeps 100,000)."""
    client = Client(sim_url)
    try:
        begin = client.si.CurrentTime()
        for event in events.simulator_mix(client.content, count):
            client.post(event)
        return begin
    finally:
        client.close()


def read_pyvmomi(session: Session, begin: datetime) -> tuple[int, float]:
    """Baseline: ``(events, seconds)`` of reading with a bare collector."""
    content = session.content
    started = time.perf_counter()
    spec = vim.event.EventFilterSpec(time=vim.event.EventFilterSpec.ByTime(beginTime=begin))
    collector = content.eventManager.CreateCollectorForEvents(spec)
    collector.SetCollectorPageSize(MAX_PAGE_SIZE)
    count = 0
    while True:
        page = collector.ReadNextEvents(MAX_PAGE_SIZE)
        count += len(page or ())
        if not page or len(page) < MAX_PAGE_SIZE:
            break
    collector.DestroyCollector()
    return count, time.perf_counter() - started


def new_reader(session: Session, begin: datetime, settings: config.Settings) -> EventReader:
    """The producer's reader, configured as :meth:`ProducerService.start` does."""
    return EventReader(session.content, begin=begin, floor=begin, seen=SeenKeys(),
                       page_size=settings.vcenter.page_size)


def read_reader(session: Session, begin: datetime,
                settings: config.Settings) -> tuple[int, float]:
    """``(events, seconds)`` of :class:`EventReader` polling until nothing is new."""
    reader = new_reader(session, begin, settings)
    started = time.perf_counter()
    reader.open()
    count = 0
    while batch := reader.poll():
        count += len(batch)
        reader.confirmed([e.key for e in batch], begin)
    reader.close()
    return count, time.perf_counter() - started


def run_pipeline(settings: config.Settings, app: Celery, session: Session,
                 begin: datetime) -> tuple[int, int, float]:
    """``(events, tasks, seconds)`` of the producer's poll → convert → publish → checkpoint,
    with a fresh :class:`ProducerService` holding its lease, from an empty database."""
    service = ProducerService(settings, app=app)
    redisdb.flush(service.redis)
    if not service.lease.try_acquire():
        raise RuntimeError("another producer holds the lease of the simulator")
    try:
        service.session = session
        service.store = CheckpointStore(service.redis, session.instance_uuid,
                                        settings.vcenter.checkpoint_max_age)
        service.reader = new_reader(session, begin, settings)
        service.publisher.declare({t.pool for t in settings.triggers})
        count = tasks = 0
        started = time.perf_counter()
        service.reader.open()
        while batch := service.reader.poll():
            pending = service._convert(batch)
            if not service._publish(pending):
                raise RuntimeError("Redis did not take a batch")
            count += len(pending)
            tasks += sum(len(item.messages) for item in pending)
        seconds = time.perf_counter() - started
        service.reader.close()
    finally:
        service.lease.release()
    return count, tasks, seconds


def measure(profile: Profile, redis_url: str, sim_url: str) -> dict[str, Any]:
    settings = settings_for(sim_url, redis_url)
    begin = fill_simulator(sim_url, profile.drain_events)
    session = connect(settings.vcenter)
    app = sender_app(settings, "bench-drain")
    r = redisdb.connect(redis_url)
    rates: dict[str, list[float]] = {"pyvmomi": [], "reader": [], "pipeline": []}
    counts: dict[str, int] = {}
    tasks = 0
    steps = {
        "pyvmomi": lambda: read_pyvmomi(session, begin),
        "reader": lambda: read_reader(session, begin, settings),
        "pipeline": lambda: run_pipeline(settings, app, session, begin),
    }
    try:
        steps["pipeline"]()  # warm-up: first conversions, connections, queue declarations
        for repeat in range(profile.repeats):
            names = list(steps)
            names = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in names:
                count, *rest = steps[name]()
                seconds = rest[-1]
                if name == "pipeline":
                    tasks = rest[0]
                counts[name] = count
                rates[name].append(count / seconds)
    finally:
        redisdb.flush(r)
        session.close()
    return {
        "events": counts,
        "tasks_per_drain": tasks,
        "page_size": settings.vcenter.page_size,
        "events_per_s": {name: summary(values) for name, values in rates.items()},
        "ratio_pipeline_to_pyvmomi": paired_ratio(rates["pipeline"], rates["pyvmomi"]),
        "ratio_reader_to_pyvmomi": paired_ratio(rates["reader"], rates["pyvmomi"]),
        "tasks_per_s": summary([r * tasks / counts["pipeline"] for r in rates["pipeline"]]),
    }
