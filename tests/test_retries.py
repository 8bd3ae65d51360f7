"""Retries: the policy's delays, the durable schedule in Redis, and real workers retrying (also
across a ``kill -9`` during a back-off)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Reject, Retry

from tests import flaky_functions as flaky
from tests.support import Proc, start_worker, wait_until
from vebaq.core import deadletters, keys, retrystore
from vebaq.core.config import RetryPolicy
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from workers import execution, retries, scheduler
from workers.app import create_app
from workers.errors import PermanentError
from workers.retries import DeadLettered, Failure

#: The fast policy the worker tests configure (retry: 3, backoffDelay: 0.2s, maxDelay: 1s).
FAST = RetryPolicy(max_retries=3, initial_delay=0.2, max_delay=1.0)


class Throttled(Exception):
    """Like the vROps client's ``VropsUnavailable``: carries the server's ``Retry-After``."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__("slow down")
        self.retry_after = retry_after


def fake_task(name: str = "FlakyEvent") -> Any:
    """What :func:`workers.retries.handle_failures` reads of a Celery task."""
    return SimpleNamespace(name=name, request=SimpleNamespace(id="task-1"))


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    app = create_app(broker_url=redis_url)
    yield app
    app.close()


def first_delivery(event: dict[str, Any]) -> TaskMessage:
    return TaskMessage("FlakyEvent", event, "flaky")


def retry_of(event: dict[str, Any], attempt: int = 2) -> TaskMessage:
    """A retry of the ``flaky`` function for ``event``."""
    return TaskMessage("FlakyEvent", event, "flaky", attempt, ("flaky",), first_failed_at=123.0)


def start_flaky_worker(env: dict[str, str], log_dir: Path, name: str = "worker-flaky") -> Proc:
    return start_worker("flaky", env, log_dir, name=name, extra=flaky.QUICK_START)


@pytest.fixture
def flaky_worker(redis_url: str, tmp_path: Path, log_dir: Path) -> Iterator[Proc]:
    """A worker of the ``flaky`` pool with the :data:`FAST` retry policy."""
    worker = start_flaky_worker(flaky.worker_env(redis_url, tmp_path), log_dir)
    yield worker
    worker.stop()


# --- the policy


def test_the_delay_is_the_back_off_or_the_servers_capped_retry_after_if_longer() -> None:
    policy = RetryPolicy(max_retries=5, initial_delay=1.0, max_delay=600.0, jitter=False)
    assert retries.retry_delay(policy, 3, [ValueError()]) == 4.0
    assert retries.retry_delay(policy, 1, [Throttled(30)]) == 30.0
    # A server's Retry-After is capped (maxRetryAfter, an hour by default).
    assert retries.retry_delay(policy, 1, [Throttled(10 ** 9)]) == 3600.0
    capped = RetryPolicy(max_retries=5, initial_delay=1.0, max_retry_after=60.0, jitter=False)
    assert retries.retry_delay(capped, 1, [Throttled(10 ** 9)]) == 60.0
    assert retries.retry_delay(policy, 3, [Throttled(2)]) == 4.0
    assert retries.retry_delay(policy, 1, [Throttled(None)]) == 1.0
    jittered = RetryPolicy(max_retries=5, initial_delay=1.0, max_delay=600.0)
    assert retries.retry_delay(jittered, 3, [ValueError()], rand=lambda: 0.0) == 2.0


def test_a_retryable_failure_becomes_a_retry_in_redis(redis_client: redis.Redis) -> None:
    event = flaky.structured_event("FlakyEvent", {"fail_times": 1})
    policy = RetryPolicy(max_retries=3, initial_delay=0.2, max_delay=1.0, jitter=False)
    before = time.time()
    with pytest.raises(Retry) as raised:
        retries.handle_failures(fake_task(), redis_client, first_delivery(event),
                                [Failure("flaky", ValueError("boom"))], policy=policy)
    assert "flaky failed (attempt 1 of 4)" in str(raised.value)
    assert "ValueError: boom" in str(raised.value)

    [(retry_id, raw)] = redis_client.hgetall(keys.RETRIES_RECORDS).items()
    record = json.loads(raw)
    assert record["event"] == event and record["pool"] == "flaky"
    assert record["task"] == "FlakyEvent" and record["functions"] == ["flaky"]
    assert record["attempt"] == 2 and record["delay"] == 0.2
    assert record["last_error"] == "ValueError: boom"
    assert before <= record["first_failed_at"] <= time.time()
    assert redis_client.zscore(keys.RETRIES_DUE, retry_id) is not None
    assert deadletters.depth(redis_client) == 0


def test_the_last_attempt_and_a_permanent_error_are_dead_lettered(
        redis_client: redis.Redis) -> None:
    event = flaky.structured_event("FlakyEvent", {"fail_times": 9})
    with pytest.raises(DeadLettered) as raised:
        retries.handle_failures(fake_task(), redis_client,
                                TaskMessage("FlakyEvent", event, "flaky", 4,
                                            first_failed_at=1000.0),
                                [Failure("flaky", ValueError("still broken"))], policy=FAST)
    [letter_id] = raised.value.letter_ids
    assert str(raised.value) == (f"dead letter {letter_id}: flaky: ValueError: still broken")
    letter = deadletters.get(redis_client, letter_id)
    assert letter["attempts"] == 4 and letter["first_failed_at"] == 1000.0
    assert letter["task_id"] == "task-1" and letter["event"] == event

    with pytest.raises(DeadLettered):
        retries.handle_failures(fake_task(), redis_client, first_delivery(event),
                                [Failure("flaky", PermanentError("bad request"))], policy=FAST)
    assert retrystore.pending(redis_client) == 0
    assert deadletters.depth(redis_client) == 2


def test_one_message_can_dead_letter_a_function_and_retry_another(
        redis_client: redis.Redis) -> None:
    event = flaky.structured_event("FlakyEvent", {"fail_times": 1})
    with pytest.raises(DeadLettered) as raised:
        retries.handle_failures(fake_task(), redis_client, first_delivery(event),
                                [Failure("a", PermanentError("no")), Failure("b", Throttled(5))],
                                policy=FAST)
    assert "dead letter" in str(raised.value) and "retry" in str(raised.value)
    [letter] = deadletters.list_letters(redis_client)
    assert letter["function"] == "a"
    [raw] = redis_client.hvals(keys.RETRIES_RECORDS)
    record = json.loads(raw)
    assert record["functions"] == ["b"] and record["delay"] == 5.0  # Retry-After wins


def test_when_redis_fails_the_message_goes_back_to_its_queue() -> None:
    task = SimpleNamespace(name="GoodEvent", request=SimpleNamespace(id="task-1"),
                           app=SimpleNamespace(conf=SimpleNamespace(
                               broker_url="redis://127.0.0.1:1/0")))
    with pytest.raises(Reject) as raised:  # not acked as a failure: rejected and requeued
        execution.handle(task, {"event": flaky.structured_event("GoodEvent"), "pool": "flaky"})
    assert raised.value.requeue and "ConnectionError" in str(raised.value.reason)


def test_a_retry_of_a_function_that_is_gone_is_dead_lettered(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEBAQ_BROKER_URL", redis_url)  # where the test functions count
    task = SimpleNamespace(name="GoodEvent", request=SimpleNamespace(id="task-1"),
                           app=SimpleNamespace(conf=SimpleNamespace(broker_url=redis_url)))
    event = flaky.structured_event("GoodEvent")
    with pytest.raises(DeadLettered):
        execution.handle(task, {"event": event, "pool": "flaky", "attempt": 2,
                                "functions": ["good", "renamed"]})
    [letter] = deadletters.list_letters(redis_client)
    assert letter["function"] == "renamed" and letter["exception"] == "PermanentError"
    assert letter["error"] == "no function 'renamed' handles GoodEvent in pool 'flaky' any more"
    assert redis_client.lrange(flaky.successes_key("good"), 0, -1) == [event["id"].encode()]


# --- the schedule


def test_claims_are_exclusive_between_concurrent_schedulers(redis_url: str,
                                                            redis_client: redis.Redis) -> None:
    scheduled = {retrystore.schedule(redis_client, retry_of({}), delay=0, last_error="x")[0]
                 for _ in range(300)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        r = redis.Redis.from_url(redis_url)
        while batch := retrystore.claim(r, limit=7):
            with lock:
                claimed.extend(retry.id for retry in batch)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(scheduled)  # each exactly once


def test_an_expired_claim_is_given_back_and_claimed_again(redis_client: redis.Redis) -> None:
    retry_id, _ = retrystore.schedule(redis_client, retry_of({}), delay=0, last_error="x")
    assert [retry.id for retry in retrystore.claim(redis_client)] == [retry_id]
    assert retrystore.claim(redis_client) == []  # held by a live claim
    assert retrystore.pending(redis_client) == 1

    # The claimer died before sending: once its lease ran out, the next sweep takes it back.
    redis_client.zadd(keys.RETRIES_CLAIMED, {retry_id: 0})
    [again] = retrystore.claim(redis_client)
    assert again.id == retry_id and again.message.attempt == 2


def test_a_sweep_sends_what_is_due_to_the_pools_queue(celery_app: Celery,
                                                      redis_client: redis.Redis) -> None:
    event = flaky.structured_event("FlakyEvent", {"fail_times": 1})
    retrystore.schedule(redis_client, retry_of(event, attempt=2), delay=0, last_error="x")
    retrystore.schedule(redis_client, retry_of(event, attempt=3), delay=3600, last_error="x")
    assert scheduler.sweep(Publisher(celery_app), redis_client) == 1
    [message] = flaky.queued(redis_client, "flaky")
    assert message["headers"]["task"] == "FlakyEvent"
    assert message["headers"]["id"] == f"{event['id']}:flaky:attempt2"
    assert message["kwargs"] == {"event": event, "pool": "flaky", "attempt": 2,
                                 "functions": ["flaky"], "first_failed_at": 123.0}
    assert retrystore.pending(redis_client) == 1  # the one due in an hour
    assert redis_client.hlen(keys.RETRIES_RECORDS) == 1


# --- real workers

def calls(r: redis.Redis, function: str, event: dict[str, Any]) -> int:
    return int(r.get(flaky.calls_key(function, event["id"])) or 0)


def succeeded(r: redis.Redis, function: str) -> list[str]:
    return [i.decode() for i in r.lrange(flaky.successes_key(function), 0, -1)]


def settled(r: redis.Redis) -> bool:
    """Nothing queued, unacked or scheduled any more."""
    return (r.llen("flaky") == 0 and r.hlen("unacked") == 0
            and retrystore.pending(r) == 0)


class TaskEvents:
    """The Celery task events a Flower would see, collected in a thread."""

    def __init__(self, app: Celery, r: redis.Redis) -> None:
        self.app, self.seen = app, []
        self.receiver: Any = None
        patterns = r.pubsub_numpat()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_until(lambda: r.pubsub_numpat() > patterns, 10, "the event receiver to subscribe")

    def _run(self) -> None:
        with self.app.connection() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.seen.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == kind]

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)


@pytest.mark.slow
def test_a_function_failing_n_times_succeeds_after_exactly_n_retries(
        flaky_worker: Proc, celery_app: Celery, redis_client: redis.Redis) -> None:
    event = flaky.send(celery_app, "FlakyEvent", {"fail_times": 2})

    wait_until(lambda: event["id"] in succeeded(redis_client, "flaky"), 30, "the third attempt")
    flaky_worker.wait_for(rf"Task FlakyEvent\[{event['id']}:flaky:attempt3\] succeeded")
    wait_until(lambda: settled(redis_client), 10, "the queue to be empty")
    assert calls(redis_client, "flaky", event) == 3  # the first run and exactly 2 retries
    assert succeeded(redis_client, "flaky") == [event["id"]]
    assert deadletters.depth(redis_client) == 0
    log = flaky_worker.log()
    assert "flaky failed (attempt 1 of 4)" in log and "flaky failed (attempt 2 of 4)" in log
    assert "attempt 3 of 4" not in log


@pytest.mark.slow
def test_a_function_that_always_fails_is_dead_lettered_after_max_retries(
        flaky_worker: Proc, celery_app: Celery, redis_client: redis.Redis) -> None:
    events = TaskEvents(celery_app, redis_client)
    before = time.time()
    event = flaky.send(celery_app, "DoomedEvent")

    wait_until(lambda: deadletters.depth(redis_client) == 1, 30, "the dead letter")
    wait_until(lambda: settled(redis_client), 10, "the message to be acked, not requeued")
    assert calls(redis_client, "doomed", event) == 4  # max_retries + 1 runs, no more

    [letter] = deadletters.list_letters(redis_client)
    assert letter["task"] == "DoomedEvent" and letter["pool"] == "flaky"
    assert letter["function"] == "doomed" and letter["event"] == event
    assert letter["attempts"] == FAST.max_retries + 1
    assert letter["exception"] == "DownstreamDown"
    assert letter["error"] == "downstream is down (call 4)"
    assert "raise DownstreamDown" in letter["traceback"]
    assert before <= letter["first_failed_at"] < letter["last_failed_at"] <= time.time()
    assert letter["task_id"] == f"{event['id']}:flaky:attempt4"
    assert deadletters.counts(redis_client) == {("DoomedEvent", "flaky"): 1}

    # What Flower shows: three retries with their reason, then a failure naming the dead letter.
    wait_until(lambda: events.of("task-failed"), 10, "the task-failed event")
    events.stop()
    retried = events.of("task-retried")
    assert len(retried) == 3
    assert all("DownstreamDown" in e["exception"] for e in retried)
    [failed] = events.of("task-failed")
    assert failed["uuid"] == letter["task_id"]
    assert f"dead letter {letter['id']}" in failed["exception"]
    assert "DeadLettered" in failed["exception"]


@pytest.mark.slow
def test_replay_after_fixing_the_cause_completes_the_event(
        flaky_worker: Proc, celery_app: Celery, redis_client: redis.Redis) -> None:
    event = flaky.send(celery_app, "DoomedEvent")
    wait_until(lambda: deadletters.depth(redis_client) == 1, 30, "the dead letter")
    [letter] = deadletters.list_letters(redis_client)

    redis_client.set(flaky.FIXED, 1)  # the operator fixes the downstream service
    deadletters.replay(Publisher(celery_app), redis_client, letter["id"])
    assert deadletters.depth(redis_client) == 0

    wait_until(lambda: succeeded(redis_client, "doomed") == [event["id"]], 30, "the replay")
    wait_until(lambda: settled(redis_client), 10, "the queue to be empty")
    assert calls(redis_client, "doomed", event) == 5
    assert deadletters.depth(redis_client) == 0
    assert deadletters.counts(redis_client) == {}


@pytest.mark.slow
def test_a_retry_survives_killing_the_worker_during_its_back_off(
        redis_url: str, tmp_path: Path, log_dir: Path, celery_app: Celery,
        redis_client: redis.Redis) -> None:
    env = flaky.worker_env(redis_url, tmp_path, retry=2, backoffDelay="3s", jitter="false")
    worker = start_flaky_worker(env, log_dir)
    event = flaky.send(celery_app, "FlakyEvent", {"fail_times": 1})
    wait_until(lambda: redis_client.zcard(keys.RETRIES_DUE) == 1, 30, "the retry to be scheduled")
    worker.wait_for(r"retry: flaky failed \(attempt 1 of 3\)")
    wait_until(lambda: redis_client.hlen("unacked") == 0, 10, "the failed message to be acked")

    worker.signal(signal.SIGKILL)  # the whole process group: main process and its children
    worker.popen.wait(10)
    worker.stop()
    assert calls(redis_client, "flaky", event) == 1
    assert retrystore.pending(redis_client) == 1  # the retry is in Redis, not in a dead process

    again = start_flaky_worker(env, log_dir, name="worker-flaky-again")
    try:
        wait_until(lambda: event["id"] in succeeded(redis_client, "flaky"), 30, "the retry")
        again.wait_for(rf"Task FlakyEvent\[{event['id']}:flaky:attempt2\] succeeded")
    finally:
        again.stop()
    assert calls(redis_client, "flaky", event) == 2
    assert retrystore.pending(redis_client) == 0
    assert deadletters.depth(redis_client) == 0
