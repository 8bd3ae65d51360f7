"""The poison breaker and the time limits, on real worker processes.

A function that kills the process running it — ``kill -9`` of itself, ``os._exit``, or killed
from outside like the OOM killer does — is delivered ``maxDeliveries`` (3) times, then
dead-lettered with the reason, while the other events keep flowing; on the prefork pool the
child dies, on the threads pool the whole worker, which the test restarts as Docker's ``restart:
unless-stopped`` would. Each test prints how many deliveries ran before the breaker tripped.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests import flaky_functions as flaky
from tests import poison_functions as poison
from tests.support import Proc, start_worker, wait_until
from tests.test_retries import TaskEvents
from vebaq.core import deadletters, keys
from workers.app import create_app

pytestmark = pytest.mark.slow

#: Seconds before an unacked task of a dead worker is delivered again, in these tests: short,
#: for the threads pool, whose tasks come back only after it. On the prefork pool, whose
#: parent requeues at once, it is longer (its default time limits follow it): billiard takes a
#: few seconds to notice some of its children's deaths.
VISIBILITY = {"threads": 4, "prefork": 20}
MAX_DELIVERIES = 3


def poison_env(redis_url: str, config_dir: Path, visibility: float = 4,
               **pool: Any) -> dict[str, str]:
    """A ``poison`` pool worker's environment: the test functions, a short visibility timeout,
    and the pool's settings (``maxDeliveries: 3`` unless ``pool`` says otherwise)."""
    settings = {"maxDeliveries": MAX_DELIVERIES, "retry": 1, "backoffDelay": "0.2s", **pool}
    config = config_dir / "vebaq.yaml"
    config.write_text("pools:\n  poison: {" + ", ".join(f"{k}: {v}" for k, v in settings.items())
                      + "}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    env.update({"VEBAQ_BROKER_URL": redis_url, "VEBAQ_CONFIG": str(config),
                "VEBAQ_FUNCTIONS": "tests.poison_functions",
                "VEBAQ_VISIBILITY_TIMEOUT": str(visibility), "PYTHONUNBUFFERED": "1"})
    return env


class Supervised:
    """A ``poison`` worker that is started again whenever it exits, as Docker's ``restart:
    unless-stopped`` does (a threads-pool worker dies whole with a poison function)."""

    def __init__(self, env: dict[str, str], log_dir: Path, pool_impl: str) -> None:
        self.env, self.log_dir, self.pool_impl = env, log_dir, pool_impl
        self.procs = [self._start()]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _start(self) -> Proc:
        return start_worker("poison", self.env, self.log_dir, concurrency=2,
                            name=f"poison-{self.pool_impl}-{len(getattr(self, 'procs', []))}",
                            extra=("-P", self.pool_impl, *flaky.QUICK_START))

    def _watch(self) -> None:
        while not self.stopping.wait(0.2):
            if self.procs[-1].popen.poll() is not None:
                self.procs.append(self._start())

    @property
    def restarts(self) -> int:
        return len(self.procs) - 1

    def log(self) -> str:
        return "".join(proc.log() for proc in self.procs)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(90)
        self.procs[-1].stop()


class OomKiller(threading.Thread):
    """Kills with SIGKILL every process ``HogEvent``'s function reports running in."""

    def __init__(self, r: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.redis, self.kills = r, 0
        self.stopping = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            popped = self.redis.blpop([poison.HOG_PIDS], timeout=0.5)
            if popped:
                os.kill(int(popped[1]), signal.SIGKILL)
                self.kills += 1


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = create_app(broker_url=redis_url)
    yield app
    app.close()


def good_handled(r: redis.Redis) -> set[str]:
    return {i.decode() for i in r.lrange(poison.GOOD, 0, -1)}


def runs(r: redis.Redis, function: str, event: dict[str, Any]) -> int:
    return int(r.get(poison.runs_key(function, event["id"])) or 0)


def letters_of(r: redis.Redis, event: dict[str, Any]) -> list[dict[str, Any]]:
    return [letter for letter in deadletters.list_letters(r)
            if (letter.get("event") or {}).get("id") == event["id"]]


KILLS = {  # kill kind → (subject, function)
    "sigkill": ("SigkillEvent", "sigkill"),
    "os._exit": ("ExitEvent", "exits"),
    "oom-kill": ("HogEvent", "hog"),
}
#: How the prefork parent reports each kind of death.
PREFORK_STATUS = {"sigkill": "signal 9 (SIGKILL)", "os._exit": "exitcode 1",
                  "oom-kill": "signal 9 (SIGKILL)"}


@pytest.mark.parametrize("pool_impl", ["prefork", "threads"])
@pytest.mark.parametrize("kill", list(KILLS))
def test_a_function_that_kills_its_worker_is_dead_lettered_after_max_deliveries(
        kill: str, pool_impl: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path,
        log_dir: Path, app: Celery) -> None:
    subject, function = KILLS[kill]
    worker = Supervised(poison_env(redis_url, tmp_path, VISIBILITY[pool_impl]), log_dir,
                        pool_impl)
    killer = OomKiller(redis_client) if kill == "oom-kill" else None
    events = TaskEvents(app, redis_client)
    try:
        good = [flaky.send(app, "GoodEvent", pool="poison")["id"] for _ in range(10)]
        # On the threads pool each kill takes the worker's consumer with it, while events flow:
        # a message it was taking is in Redis' unacked record (vebaq.core.transport) and comes
        # back after the visibility timeout.
        started = time.monotonic()
        bad = flaky.send(app, subject, pool="poison")
        good_during: list[str] = []
        while not letters_of(redis_client, bad):  # events keep coming while it kills workers
            assert time.monotonic() - started < 300, "the breaker did not trip in 300 s"
            good_during.append(flaky.send(app, "GoodEvent", pool="poison")["id"])
            time.sleep(0.5)
        tripped_after = time.monotonic() - started
        good_after = [flaky.send(app, "GoodEvent", pool="poison")["id"] for _ in range(10)]
        everything = set(good + good_during + good_after)
        wait_until(lambda: everything <= good_handled(redis_client), 120,
                   "every good event handled")
        wait_until(lambda: redis_client.llen("poison") == 0 and redis_client.hlen("unacked") == 0,
                   60, "nothing left queued or unacked")
        wait_until(lambda: events.of("task-failed"), 10, "the task-failed event")
    finally:
        events.stop()
        if killer:
            killer.stopping.set()
            killer.join(5)
        worker.stop()

    deliveries = runs(redis_client, function, bad)
    [letter] = letters_of(redis_client, bad)
    print(f"\n[poison breaker: {kill}, {pool_impl}] deliveries before the breaker tripped="
          f"{deliveries}, tripped after {tripped_after:.1f}s, worker restarts={worker.restarts}, "
          f"other events sent={len(everything)} handled="
          f"{len(everything & good_handled(redis_client))}; reason: {letter['error']}")
    assert deliveries == MAX_DELIVERIES
    assert letter["function"] == function and letter["exception"] == "WorkerLost"
    assert letter["attempts"] == MAX_DELIVERIES and letter["pool"] == "poison"
    assert letter["error"].startswith(f"worker lost 3 times while running {function}")
    if pool_impl == "prefork":  # the parent saw how the child ended
        assert letter["error"].endswith(f": {PREFORK_STATUS[kill]}")
        assert worker.restarts == 0  # only pool children died
    else:
        assert "no exit status" in letter["error"]
        assert worker.restarts == MAX_DELIVERIES
    assert len(everything & good_handled(redis_client)) == len(everything)
    [failed] = [e for e in events.of("task-failed") if e["uuid"] == letter["task_id"]]
    assert "DeadLettered" in failed["exception"] and "worker lost 3 times" in failed["exception"]
    assert not redis_client.keys(keys.delivery("*"))  # no journal left behind


def test_only_the_function_that_kills_is_dead_lettered_the_done_one_ran_once(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path, log_dir: Path,
        app: Celery) -> None:
    worker = Supervised(poison_env(redis_url, tmp_path, VISIBILITY["prefork"]), log_dir,
                        "prefork")
    try:
        event = flaky.send(app, "TwoStepEvent", pool="poison")
        wait_until(lambda: letters_of(redis_client, event), 120, "the dead letter")
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, "the message acked")
    finally:
        worker.stop()
    [letter] = letters_of(redis_client, event)
    print(f"\n[poison breaker: second of two functions] step_one runs="
          f"{runs(redis_client, 'step_one', event)}, step_two runs="
          f"{runs(redis_client, 'step_two', event)}; reason: {letter['error']}")
    assert runs(redis_client, "step_one", event) == 1  # its done marker skipped it after
    assert runs(redis_client, "step_two", event) == MAX_DELIVERIES
    assert letter["function"] == "step_two"


def test_a_worker_lost_after_the_functions_ran_is_not_counted_as_poison(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path, log_dir: Path,
        app: Celery) -> None:
    worker = Supervised(poison_env(redis_url, tmp_path, VISIBILITY["prefork"]), log_dir,
                        "prefork")
    deaths = MAX_DELIVERIES + 2
    try:
        event = flaky.send(app, "DiesAfterDoneEvent", {"deaths": deaths}, pool="poison")
        wait_until(lambda: int(redis_client.get(f"{poison.PREFIX}:deaths:{event['id']}") or 0)
                   > deaths, 120, "the delivery after the last death")
        wait_until(lambda: redis_client.llen("poison") == 0 and redis_client.hlen("unacked") == 0,
                   30, "the message acked")
    finally:
        worker.stop()
    print(f"\n[poison breaker: worker lost after the function ran] deliveries={deaths + 1}, "
          f"function runs={runs(redis_client, 'dies_after', event)}, dead letters="
          f"{len(letters_of(redis_client, event))}")
    assert runs(redis_client, "dies_after", event) == 1
    assert letters_of(redis_client, event) == []
    assert "duplicate delivery suppressed" in worker.log()


def test_a_function_past_the_hard_time_limit_is_killed_and_dead_lettered(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path, log_dir: Path,
        app: Celery) -> None:
    worker = Supervised(poison_env(redis_url, tmp_path, softTimeLimit="1s", timeLimit="2s"),
                        log_dir, "prefork")
    try:
        started = time.monotonic()
        stuck = flaky.send(app, "StubbornEvent", pool="poison")
        good = [flaky.send(app, "GoodEvent", pool="poison")["id"] for _ in range(10)]
        wait_until(lambda: letters_of(redis_client, stuck), 60, "the dead letter")
        took = time.monotonic() - started
        more = [flaky.send(app, "GoodEvent", pool="poison")["id"] for _ in range(10)]
        wait_until(lambda: set(good + more) <= good_handled(redis_client), 60, "good events")
        wait_until(lambda: redis_client.llen("poison") == 0 and redis_client.hlen("unacked") == 0,
                   30, "nothing left queued or unacked")
    finally:
        worker.stop()
    [letter] = letters_of(redis_client, stuck)
    print(f"\n[hard time limit 2s] dead-lettered after {took:.1f}s, runs="
          f"{runs(redis_client, 'stubborn', stuck)}; reason: {letter['error']}")
    assert runs(redis_client, "stubborn", stuck) == 1  # killed once, not redelivered
    assert letter["exception"] == "HardTimeLimit"
    assert letter["error"].startswith("hard time limit (2.0s) exceeded while running stubborn")
    assert letter["function"] is None  # a replay runs every function not done yet
    assert not redis_client.keys(keys.delivery("*"))


def test_a_function_past_the_soft_time_limit_is_retried_then_dead_lettered(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path, log_dir: Path,
        app: Celery) -> None:
    worker = Supervised(poison_env(redis_url, tmp_path, softTimeLimit="1s", timeLimit="3s"),
                        log_dir, "prefork")
    try:
        slow = flaky.send(app, "SleepyEvent", {"seconds": 30}, pool="poison")
        wait_until(lambda: letters_of(redis_client, slow), 60, "the dead letter")
    finally:
        worker.stop()
    [letter] = letters_of(redis_client, slow)
    print(f"\n[soft time limit 1s] runs={runs(redis_client, 'sleepy', slow)}; "
          f"reason: {letter['exception']}: {letter['error']}")
    assert runs(redis_client, "sleepy", slow) == 2  # the first run and its one retry
    assert letter["exception"] == "SoftTimeLimit" and letter["function"] == "sleepy"
    assert letter["error"] == "sleepy ran past the soft time limit (1s) and was interrupted"
    assert letter["attempts"] == 2


def test_the_breaker_counts_a_child_death_the_pool_noticed_only_at_the_time_limit(
        redis_url: str, redis_client: redis.Redis, tmp_path: Path, log_dir: Path,
        app: Celery) -> None:
    """billiard can take seconds to notice a child that died the moment it took a task; with a
    hard limit shorter than that (3.6 s here) the limit fires first. That must count as a lost
    worker (requeued, charged), not as a slow function (dead-lettered at once)."""
    worker = Supervised(poison_env(redis_url, tmp_path, visibility=4), log_dir, "prefork")
    try:
        bad = flaky.send(app, "SigkillEvent", pool="poison")
        wait_until(lambda: letters_of(redis_client, bad), 120, "the dead letter")
    finally:
        worker.stop()
    [letter] = letters_of(redis_client, bad)
    unnoticed = worker.log().count("its pool child had died; requeued as a lost worker")
    print(f"\n[poison breaker: hard limit 3.6 s] deliveries={runs(redis_client, 'sigkill', bad)}, "
          f"{unnoticed} of them noticed only at the time limit; reason: {letter['error']}")
    assert runs(redis_client, "sigkill", bad) == MAX_DELIVERIES
    assert letter["exception"] == "WorkerLost"
    assert letter["error"].startswith("worker lost 3 times while running sigkill: ")
