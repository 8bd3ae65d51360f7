"""Archive and replay on real processes: a real producer (the built-in simulated source, or the
vCenter simulator for the crash windows), real workers, ``vebaq replay`` as a command. Each test
prints its counts."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.cloudevent import event_id
from producer.simulated import SIMULATED_UUID
from tests import counting_functions as counting
from tests import replay_functions as audit
from tests.crash_points import CRASHED
from tests.support import ROOT, Proc, VCenter, start_producer, start_worker, vebaq_argv, wait_until
from tests.test_reliability_producer import post, queued_event_ids
from vebaq.core import keys

pytestmark = pytest.mark.slow

FUNCTIONS = "tests.counting_functions,tests.replay_functions"
#: Every event to the count pool (the producer's configuration).
COUNT_ALL = "triggers:\n  - {name: all, pool: count}\n"
#: The same, plus a function added later: power-offs to the audit pool.
WITH_AUDIT = COUNT_ALL + ("  - name: audit-power-offs\n    pool: audit\n"
                          "    filters: [{exact: {subject: VmPoweredOffEvent}}]\n")


def write_config(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def sim_env(redis_url: str) -> dict[str, str]:
    """Environment of producer, workers and commands with the simulated source."""
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    env.update({"VEBAQ_BROKER_URL": redis_url, "VEBAQ_FUNCTIONS": FUNCTIONS,
                "VCENTER_POLL_INTERVAL": "0.2", "PYTHONUNBUFFERED": "1"})
    return env


def start_simulated_producer(env: dict[str, str], log_dir: Path, *, rate: float, backlog: int = 0,
                             name: str = "producer") -> Proc:
    proc = Proc(name, vebaq_argv("producer", "--simulate", "--rate", str(rate), "--backlog",
                                 str(backlog), "--metrics-port", "0"), env, log_dir)
    proc.wait_for(r"reading vCenter", timeout=60)
    return proc


def entries(r: redis.Redis, uuid: str = SIMULATED_UUID) -> list[dict[str, Any]]:
    """The archive, in order: id, subject, creation time."""
    result = []
    for _id, fields in r.xrange(keys.archive(uuid)):
        event = json.loads(fields[b"e"])
        result.append({"id": event["id"], "subject": event["subject"],
                       "created": datetime.fromisoformat(event["time"])})
    return result


def replay(env: dict[str, str], *args: str) -> str:
    """Run ``vebaq replay`` as a user would; returns its summary (stdout)."""
    done = subprocess.run(vebaq_argv("replay", *args), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def enqueued(summary: str) -> int:
    return int(re.search(r"enqueued (\d+) ", summary).group(1))


def runs(r: redis.Redis) -> Counter:
    return Counter({k.decode(): int(v) for k, v in r.hgetall(counting.RUNS).items()})


def moment(when: datetime) -> str:
    return when.isoformat()


def test_replay_a_window_and_a_subject_through_a_new_function_then_force_it(
        sim_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    env = {**sim_env, "VEBAQ_CONFIG": write_config(tmp_path, "count.yaml", COUNT_ALL)}
    count_worker = start_worker("count", env, log_dir, concurrency=2)
    producer = start_simulated_producer(env, log_dir, rate=250)
    wait_until(lambda: redis_client.xlen(keys.archive(SIMULATED_UUID)) >= 1000, 60,
               "1,000 events archived")
    producer.stop()
    archive = entries(redis_client)
    total = len(archive)
    wait_until(lambda: len(runs(redis_client)) == total, 120, "every event counted")
    assert set(runs(redis_client)) == {e["id"] for e in archive}
    assert set(runs(redis_client).values()) == {1}
    print(f"\n[archive] {total} events through the pipeline, {total} archived, each run once")

    # a function added later (audit: power-offs) gets a window of the past, in order
    env_audit = {**env, "VEBAQ_CONFIG": write_config(tmp_path, "audit.yaml", WITH_AUDIT)}
    audit_worker = start_worker("audit", env_audit, log_dir, concurrency=1)
    since, until = archive[total // 4]["created"], archive[3 * total // 4]["created"]
    window = [e for e in archive if since <= e["created"] <= until]
    subject = "VmPoweredOffEvent"
    expected = [e["id"] for e in window if e["subject"] == subject]
    summary = replay(env_audit, "--since", moment(since), "--until", moment(until),
                     "--subject", subject)
    assert enqueued(summary) == len(expected) and expected, summary
    wait_until(lambda: redis_client.llen(audit.RUNS) >= len(expected), 60, "the audit runs")
    time.sleep(1)  # nothing more comes
    ran = audit.runs(redis_client)
    assert [r["id"] for r in ran] == expected  # exactly those, in their original order
    assert all(r["replayed"] and r["subject"] == subject for r in ran)
    assert set(runs(redis_client).values()) == {1}  # count had done them all: suppressed
    print(f"[replay] window of {len(window)} events, {len(expected)} {subject}: "
          f"the new function ran for exactly those, in order")

    # again, without --force: everything in the window is done already
    again = replay(env_audit, "--since", moment(since), "--until", moment(until))
    assert enqueued(again) == 0 and f"{len(window)} already done" in again, again
    time.sleep(2)
    assert len(audit.runs(redis_client)) == len(expected)
    assert set(runs(redis_client).values()) == {1}

    # --force: everything in the window runs once more (a fixed function)
    forced = replay(env_audit, "--since", moment(since), "--until", moment(until), "--force")
    assert enqueued(forced) == len(window), forced
    window_ids = {e["id"] for e in window}
    wait_until(lambda: sum(runs(redis_client).values()) == total + len(window)
               and len(audit.runs(redis_client)) == 2 * len(expected), 120, "the forced runs")
    time.sleep(1)
    counts = runs(redis_client)
    assert {i for i, n in counts.items() if n == 2} == window_ids
    assert {i for i, n in counts.items() if n == 1} == {e["id"] for e in archive} - window_ids
    assert Counter(r["id"] for r in audit.runs(redis_client)) == Counter(expected * 2)
    print(f"[replay --force] {len(window)} events ran once more, "
          f"{total - len(window)} outside the window did not")
    audit_worker.stop()
    count_worker.stop()


def archived_total(r: redis.Redis, stream: str) -> int:
    """Entries ever added to the stream (trimmed ones too)."""
    return int(r.xinfo_stream(stream)["entries-added"]) if r.exists(stream) else 0


class Sampler(threading.Thread):
    """Samples the archive's length and bytes every 10 ms while in its ``with`` block."""

    def __init__(self, r: redis.Redis, stream: str, meta: str) -> None:
        super().__init__(daemon=True)
        self.redis, self.stream, self.meta = r, stream, meta
        self.samples: list[tuple[int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pipe = self.redis.pipeline(transaction=False)
            pipe.xlen(self.stream)
            pipe.hget(self.meta, "bytes")
            length, size = pipe.execute()
            self.samples.append((length, int(size or 0)))
            time.sleep(0.01)

    def __enter__(self) -> list[tuple[int, int]]:
        self.start()
        return self.samples

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)


def test_the_archive_stays_within_its_bounds_while_10000_more_events_flow(
        sim_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path, "none.yaml", "triggers: []\n")  # archived, not routed
    stream, meta = keys.archive(SIMULATED_UUID), keys.archive_meta(SIMULATED_UUID)
    # bytes first: the entries bound (2,000 of ~1.1 KB) then starts within both
    for bound, env_bounds in (("bytes", {"VEBAQ_ARCHIVE_MAX_BYTES": "1MiB"}),
                              ("entries", {"VEBAQ_ARCHIVE_MAX_ENTRIES": "2000"})):
        env = {**sim_env, "VEBAQ_CONFIG": config, **env_bounds}
        before = archived_total(redis_client, stream)
        with Sampler(redis_client, stream, meta) as samples:
            producer = start_simulated_producer(env, log_dir, rate=0, backlog=10_000,
                                                name=f"producer-{bound}")
            wait_until(lambda b=before: archived_total(redis_client, stream) >= b + 10_000, 120,
                       "10,000 events archived")
            producer.stop()
        info = redis_client.xinfo_stream(stream)
        length, size = redis_client.xlen(stream), int(redis_client.hget(meta, "bytes"))
        memory = redis_client.memory_usage(stream, samples=0)
        subjects = sum(int(v) for v in
                       redis_client.hvals(keys.archive_subjects(SIMULATED_UUID)))
        print(f"\n[archive bounds: {bound}] {info['entries-added'] - before} events flowed; "
              f"largest seen {max(s[0] for s in samples)} events, "
              f"{max(s[1] for s in samples)} bytes; now {length} events, {size} bytes, "
              f"MEMORY USAGE {memory} ({memory / length:.0f} per event)")
        assert subjects == length
        if bound == "entries":
            assert max(s[0] for s in samples) <= 2000 and length == 2000
        else:
            assert max(s[1] for s in samples) <= 2**20 and size <= 2**20
            assert memory <= 2**20 * 1.1
        # the newest stayed, in order
        keys_kept = [json.loads(f[b"e"])["data"]["Key"] for _i, f in redis_client.xrange(stream)]
        assert keys_kept == list(range(keys_kept[0], keys_kept[0] + length))
        assert keys_kept[-1] == info["entries-added"]


def test_a_replay_during_live_traffic_loses_and_doubles_nothing_live(
        sim_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    env = {**sim_env, "VEBAQ_CONFIG": write_config(tmp_path, "count.yaml", COUNT_ALL)}
    worker = start_worker("count", env, log_dir, concurrency=2)
    producer = start_simulated_producer(env, log_dir, rate=300)
    wait_until(lambda: redis_client.xlen(keys.archive(SIMULATED_UUID)) >= 1500, 60,
               "1,500 events archived")
    past = entries(redis_client)
    since, until = past[100]["created"], past[1100]["created"]
    window = {e["id"] for e in past if since <= e["created"] <= until}
    at_start = len(past)
    summary = replay(env, "--since", moment(since), "--until", moment(until), "--force")
    during = redis_client.xlen(keys.archive(SIMULATED_UUID)) - at_start
    time.sleep(2)  # live traffic goes on after the replay
    producer.stop()
    archive = entries(redis_client)
    live = {e["id"] for e in archive} - window
    wait_until(lambda: sum(runs(redis_client).values()) >= len(archive) + len(window), 120,
               "every event and every replay handled")
    time.sleep(1)
    counts = runs(redis_client)
    lost = len([i for i in live if counts[i] == 0])
    doubled = len([i for i in live if counts[i] > 1])
    print(f"\n[replay during live traffic] live sent={len(live)} handled="
          f"{len([i for i in live if counts[i] == 1])} lost={lost} duplicates={doubled}; "
          f"replayed {len(window)} (--force) while {during} new events were archived")
    assert enqueued(summary) == len(window)
    assert lost == 0 and doubled == 0
    assert all(counts[i] == 2 for i in window)
    assert len(archive) == len({e["id"] for e in archive})  # the archive has each event once
    worker.stop()


@pytest.mark.parametrize("point", ["before-archive", "after-archive"])
def test_kill_9_between_enqueue_archive_and_checkpoint_archives_each_event_once(
        point: str, stack_env: dict[str, str], log_dir: Path, vcenter: VCenter,
        redis_client: redis.Redis, tmp_path: Path) -> None:
    config = write_config(tmp_path, "echo.yaml", "triggers: [{name: all, pool: echo}]\n")
    env = {**stack_env, "VEBAQ_CONFIG": config, "VEBAQ_FUNCTIONS": "tests.crash_points"}
    warm = start_producer(env, log_dir, name="producer-warm")
    warm_ids = [event_id(vcenter.instance_uuid, k) for k in post(vcenter, 1, "warm-up")]
    wait_until(lambda: redis_client.keys("vebaq:checkpoint:*"), 30, "a first checkpoint")
    warm.stop()

    sent = warm_ids + [event_id(vcenter.instance_uuid, k) for k in post(vcenter, 200, point)]
    victim = Proc(f"producer-{point}", vebaq_argv("producer", "--metrics-port", "0"),
                  {**env, "VEBAQ_TEST_CRASH": point}, log_dir)
    victim.popen.wait(60)
    assert victim.popen.returncode == -signal.SIGKILL and redis_client.get(CRASHED)
    stream = keys.archive(vcenter.instance_uuid)
    archived_at_kill = {e["id"] for e in entries(redis_client, vcenter.instance_uuid)}
    enqueued_at_kill = set(queued_event_ids(redis_client))
    # killed in the first batch after the warm-up: its tasks are enqueued, the checkpoint not;
    # archived is always enqueued (the simulator adds login events of its own)
    batch = set(sent[1:])
    assert enqueued_at_kill & batch and archived_at_kill <= enqueued_at_kill
    if point == "before-archive":
        assert not archived_at_kill & batch
    else:
        assert archived_at_kill & batch

    survivor = start_producer({**env, "VEBAQ_TEST_CRASH": point}, log_dir,
                              name=f"survivor-{point}")
    wait_until(lambda: set(sent) <= {e["id"] for e in entries(redis_client,
                                                               vcenter.instance_uuid)},
               60, "every event archived after the restart")
    survivor.wait_for("checkpoint at event")
    survivor.stop()
    archived = [e["id"] for e in entries(redis_client, vcenter.instance_uuid)]
    ours = [i for i in archived if i in set(sent)]
    duplicates = len(ours) - len(set(ours))
    print(f"\n[kill -9 {point}] sent={len(sent)} archived={len(set(ours))} "
          f"duplicates={duplicates} lost={len(set(sent) - set(ours))}; "
          f"{len(enqueued_at_kill)} task(s) were enqueued at the kill")
    assert duplicates == 0 and set(ours) == set(sent)
    assert ours == [i for i in sent if i in set(ours)]  # in vCenter's order
    assert redis_client.scard(keys.archive_unsettled(vcenter.instance_uuid)) == 0
    if point == "after-archive":
        assert "were archived already" in survivor.log()
    assert redis_client.xlen(stream) == len(archived)


def test_ctrl_c_stops_a_replay_between_batches(sim_env: dict[str, str],
                                               redis_client: redis.Redis) -> None:
    from tests.archived_events import BASE, NOW, SOURCE, UUID, events, ids
    from vebaq.core.archive import Archive

    archive = Archive(redis_client)
    stream = events(20_000, step=timedelta(milliseconds=10))
    for i in range(0, len(stream), 1000):
        archive.append(UUID, SOURCE, stream[i:i + 1000], now=NOW)
        archive.settle(UUID, ids(stream[i:i + 1000]))
    replaying = subprocess.Popen(
        vebaq_argv("replay", "--since", BASE.isoformat(), "--pool", "count"), env=sim_env,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: redis_client.llen("count") > 0, 60, "the replay to start sending",
               interval=0.01)
    replaying.send_signal(signal.SIGINT)
    out, err = replaying.communicate(timeout=60)
    sent = redis_client.llen("count")
    print(f"\n[replay Ctrl-C] {sent} of {len(stream)} events enqueued when stopped")
    assert replaying.returncode == 130, err
    assert 0 < sent < len(stream) and sent % 500 == 0  # whole batches only
    assert f"enqueued {sent} " in out and "stopping after the batch being sent" in err
    resume = re.search(r"resume with --since (\S+)", out).group(1)
    assert datetime.fromisoformat(resume) == stream[sent][1]
