"""The event archive on real Redis: order, duplicates, bounds kept exactly, statistics that match
the stream, time windows, and what it does when Redis is near or at maxmemory (a private
redis-server: the test changes its maxmemory)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from tests.archived_events import BASE, NOW, SOURCE, UUID, Archived, events, ids
from tests.support import wait_until
from vebaq.core import keys
from vebaq.core.archive import ENTRY_OVERHEAD, Archive
from vebaq.core.config import ArchiveSettings
from vebaq.devtools.embedded import free_port


def recount(r: redis.Redis) -> tuple[int, Counter]:
    """Bytes and subjects recomputed from the stream itself."""
    size, subjects = 0, Counter()
    for _id, fields in r.xrange(keys.archive(UUID)):
        size += len(fields[b"s"]) + len(fields[b"e"]) + ENTRY_OVERHEAD
        subjects[fields[b"s"].decode()] += 1
    return size, subjects


def settle(archive: Archive, pairs: Archived) -> None:
    archive.settle(UUID, ids(pairs))


def test_events_come_back_in_order_with_statistics_that_match_the_stream(
        redis_client: redis.Redis) -> None:
    archive = Archive(redis_client)
    batch = events(300)
    result = archive.append(UUID, SOURCE, batch, now=BASE.timestamp() + 600)
    assert (result.added, result.duplicates, result.trimmed, result.length) == (300, 0, 0, 300)
    back = list(archive.read(UUID))
    assert [e.event for e in back] == [event for event, _ in batch]
    assert [e.created for e in back] == [created for _, created in batch]
    positions = [e.order for e in back]
    assert positions == sorted(positions) and len(set(positions)) == 300
    # entry ids are the events' creation times
    assert back[0].position == f"{int(BASE.timestamp() * 1000)}-0"

    stats = archive.stats(UUID, memory=True)
    size, subjects = recount(redis_client)
    assert (stats.length, stats.bytes, stats.subjects) == (300, size, dict(subjects))
    assert stats.oldest == BASE and stats.newest == BASE + timedelta(seconds=299)
    assert stats.source == SOURCE and archive.sources() == {UUID: SOURCE}
    print(f"\n[archive] {stats.memory / stats.length:.0f} bytes per event (MEMORY USAGE), "
          f"{stats.bytes / stats.length:.0f} counted")
    assert 0.8 < stats.memory / stats.bytes < 1.25  # the counted bytes track Redis' own


def test_a_batch_sent_again_before_its_checkpoint_is_archived_once(
        redis_client: redis.Redis) -> None:
    archive = Archive(redis_client)
    first, second = events(100), events(50, first_key=101, start=BASE + timedelta(minutes=5))
    archive.append(UUID, SOURCE, first, now=NOW)
    # killed before the checkpoint: the batch comes again, now with more events after it
    again = archive.append(UUID, SOURCE, first[40:] + second, now=NOW)
    assert (again.added, again.duplicates) == (50, 60)
    archive.settle(UUID, ids(first[40:] + second))
    assert redis_client.smembers(keys.archive_unsettled(UUID)) == \
        {i.encode() for i in ids(first[:40])}
    settle(archive, first)
    assert redis_client.scard(keys.archive_unsettled(UUID)) == 0
    assert [e.event["id"] for e in archive.read(UUID)] == ids(first + second)
    # once settled, the same event is new again (a real re-send cannot happen any more)
    assert archive.append(UUID, SOURCE, first[:1], now=NOW).added == 1


def test_the_bounds_hold_exactly_and_the_oldest_go_first(redis_client: redis.Redis) -> None:
    stream = events(1200)
    entry = max(len(json.dumps(e, separators=(",", ":"))) + len(e["subject"]) for e, _ in stream)
    bounds = ArchiveSettings(max_entries=500, max_bytes=2**20)
    archive = Archive(redis_client, bounds)
    for start in range(0, 1200, 100):
        batch = stream[start:start + 100]
        result = archive.append(UUID, SOURCE, batch, now=BASE.timestamp() + 3600)
        settle(archive, batch)
        assert result.length <= 500 and result.bytes <= bounds.max_bytes
    assert [e.event["id"] for e in archive.read(UUID)] == ids(stream[-500:])
    size, subjects = recount(redis_client)
    stats = archive.stats(UUID)
    assert (stats.length, stats.bytes, stats.subjects) == (500, size, dict(subjects))

    by_bytes = ArchiveSettings(max_entries=10**6, max_bytes=2**20)
    redis_client.flushdb()
    archive = Archive(redis_client, by_bytes)
    for start in range(0, 1200, 100):
        archive.append(UUID, SOURCE, stream[start:start + 100], now=BASE.timestamp() + 3600)
    stats = archive.stats(UUID)
    assert stats.bytes <= 2**20 < stats.bytes + entry + ENTRY_OVERHEAD
    assert recount(redis_client)[0] == stats.bytes


def test_events_older_than_max_age_go(redis_client: redis.Redis) -> None:
    archive = Archive(redis_client, ArchiveSettings(max_age=3600))
    old = events(10, start=BASE - timedelta(hours=2))
    recent = events(10, start=BASE - timedelta(minutes=30), first_key=11)
    result = archive.append(UUID, SOURCE, old + recent, now=BASE.timestamp())
    assert (result.added, result.trimmed, result.length) == (20, 10, 10)
    assert [e.event["id"] for e in archive.read(UUID)] == ids(recent)
    assert archive.stats(UUID).subjects == dict(recount(redis_client)[1])


def test_out_of_order_times_keep_ids_increasing_and_windows_exact(
        redis_client: redis.Redis) -> None:
    archive = Archive(redis_client)
    batch = events(6)
    # vCenter returned the fourth event's time earlier than the third's
    shuffled = [(e, c) for e, c in batch]
    late_event, _ = shuffled[3]
    early = BASE + timedelta(milliseconds=1500)
    late_event["time"] = early.isoformat().replace("+00:00", "Z")
    shuffled[3] = (late_event, early)
    archive.append(UUID, SOURCE, shuffled, now=NOW)
    back = list(archive.read(UUID))
    assert [e.order for e in back] == sorted(e.order for e in back)
    assert back[3].position == f"{int((BASE + timedelta(seconds=2)).timestamp() * 1000)}-1"
    window = list(archive.read(UUID, since=BASE + timedelta(seconds=1),
                               until=BASE + timedelta(milliseconds=1500)))
    assert [e.event["id"] for e in window] == [batch[1][0]["id"], late_event["id"]]


def test_reads_filter_by_subject_and_merge_vcenters_by_time(redis_client: redis.Redis) -> None:
    archive = Archive(redis_client)
    mine = events(40)
    later = timedelta(milliseconds=500)
    other = [({**e, "id": f"vc2-{e['id']}", "source": "https://vc2.test/sdk",
               "vcenteruuid": "vc2", "time": (c + later).isoformat()}, c + later)
             for e, c in events(40, seed=3)]
    archive.append(UUID, SOURCE, mine, now=NOW)
    archive.append("vc2", "https://vc2.test/sdk", other, now=NOW)
    merged = list(archive.read_all([UUID, "vc2"]))
    assert [e.created for e in merged] == sorted(c for _, c in mine + other)
    subject = mine[0][0]["subject"]
    only = list(archive.read_all([UUID, "vc2"], subjects=[subject],
                                 since=BASE + timedelta(seconds=10),
                                 until=BASE + timedelta(seconds=20)))
    expected = sorted(((c, e["id"]) for e, c in mine + other
                       if e["subject"] == subject
                       and BASE + timedelta(seconds=10) <= c <= BASE + timedelta(seconds=20)))
    assert [(e.created, e.event["id"]) for e in only] == expected and expected


# --- near and at maxmemory: a private server, since the test changes its maxmemory


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("this test sets a Redis server's maxmemory: it needs redis-server on PATH",
                    pytrace=False)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path),
                             "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), 10, "the private redis-server")
    yield client
    proc.terminate()
    proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_near_maxmemory_the_archive_sheds_its_oldest_and_never_a_task(
        private_redis: redis.Redis) -> None:
    r = private_redis
    archive = Archive(r)
    archive.append(UUID, SOURCE, events(2000), now=BASE.timestamp())
    queue = [f"task-{i}".encode() * 40 for i in range(2000)]
    r.rpush("echo", *queue)  # tasks waiting in a pool's queue
    used = r.info("memory")["used_memory"]
    r.config_set("maxmemory", int(used / 0.82))  # above the high water already
    more = events(200, first_key=2001, start=BASE + timedelta(hours=1))
    result = archive.append(UUID, SOURCE, more, now=BASE.timestamp())
    print(f"\n[archive near maxmemory] shed {result.shed} oldest, added {result.added}, "
          f"skipped {result.skipped}")
    assert result.shed > 0 and result.added == 200 and result.skipped == 0
    assert r.info("memory")["used_memory"] <= int(used / 0.82) * 0.8 + 100_000
    assert r.lrange("echo", 0, -1) == queue  # only archive entries went
    back = list(archive.read(UUID))
    assert back[-1].event["id"] == more[-1][0]["id"] and len(back) == 2200 - result.shed

    # the archive is gone and the queues alone fill Redis: archiving is skipped, said so
    r.delete(keys.archive(UUID), keys.archive_meta(UUID), keys.archive_subjects(UUID))
    r.rpush("echo", *[b"x" * 4000] * 500)
    r.config_set("maxmemory", int(r.info("memory")["used_memory"] / 0.81))
    skipped = archive.append(UUID, SOURCE, events(10, first_key=5000), now=BASE.timestamp())
    assert (skipped.added, skipped.skipped) == (0, 10)

    # out of memory: nothing is written, not even a trim
    r.config_set("maxmemory", 1)
    oom = archive.append(UUID, SOURCE, events(10, first_key=6000), now=BASE.timestamp())
    assert oom.out_of_memory and oom.added == 0
    r.config_set("maxmemory", 0)
