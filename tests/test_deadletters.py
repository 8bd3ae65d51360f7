"""Dead letters: the record, listing, counts, purge and replay on real Redis, and poison messages
dead-lettered by a real worker that keeps going."""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from tests import flaky_functions as flaky
from tests.support import Proc, start_worker, wait_until
from vebaq.core import deadletters
from vebaq.core.errors import NoSuchDeadLetter, NotReplayable
from vebaq.core.messages import queue_for
from vebaq.core.publish import Publisher
from workers.app import create_app
from workers.retries import DeadLettered


class HttpFailure(Exception):
    """Like the vROps client's errors: offers the Knative error extensions."""

    def knative_error_attributes(self) -> dict[str, str]:
        return {"knativeerrordest": "https://vrops.test/suite-api/api/resources",
                "knativeerrorcode": "503", "knativeerrordata": "maintenance", "other": "x"}


def raised(error: Exception) -> Exception:
    """``error`` with a traceback, as a function would have raised it."""
    try:
        raise error
    except Exception as exc:
        return exc


def add(r: redis.Redis, subject: str = "DoomedEvent", pool: str = "flaky",
        error: Exception | None = None, **fields: Any) -> str:
    return deadletters.add(r, task_name=subject, pool=pool, function="doomed",
                           event=fields.pop("event", flaky.structured_event(subject)),
                           error=error or raised(RuntimeError("down")),
                           attempt=fields.pop("attempt", 4), **fields)


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    app = create_app(broker_url=redis_url)
    yield app
    app.close()


def test_a_dead_letter_keeps_the_event_the_error_and_the_knative_attributes(
        redis_client: redis.Redis) -> None:
    event = flaky.structured_event("EnteredMaintenanceModeEvent", {"Key": 7})
    letter_id = add(redis_client, "EnteredMaintenanceModeEvent", "vrops", event=event,
                    error=raised(HttpFailure("vROps answered 503 " + "x" * 5000)), attempt=9,
                    first_failed_at=1000.0, task_id="abc:vrops:attempt9")
    letter = deadletters.get(redis_client, letter_id)
    assert letter["id"] == letter_id and letter["event"] == event
    assert (letter["task"], letter["pool"], letter["function"]) == (
        "EnteredMaintenanceModeEvent", "vrops", "doomed")
    assert letter["attempts"] == 9 and letter["task_id"] == "abc:vrops:attempt9"
    assert letter["first_failed_at"] == 1000.0 < letter["last_failed_at"]
    assert letter["exception"] == "HttpFailure"
    assert letter["error"].startswith("vROps answered 503 xxx")
    assert len(letter["error"]) == deadletters.MAX_ERROR
    assert len(letter["traceback"]) == deadletters.MAX_TRACEBACK
    assert letter["traceback"].rstrip().endswith("x")  # the end (innermost part) is kept
    assert letter["knativeerrordest"] == "https://vrops.test/suite-api/api/resources"
    assert letter["knativeerrorcode"] == "503" and letter["knativeerrordata"] == "maintenance"
    assert "other" not in letter

    plain = deadletters.get(redis_client, add(redis_client))
    assert not any(key.startswith("knativeerror") for key in plain)
    assert "raise error" in plain["traceback"]


def test_listing_filters_and_counts(redis_client: redis.Redis) -> None:
    first = add(redis_client, "DoomedEvent", "flaky")
    second = add(redis_client, "DoomedEvent", "vrops")
    third = add(redis_client, "OtherEvent", "flaky")
    assert [r["id"] for r in deadletters.list_letters(redis_client)] == [first, second, third]
    assert [r["id"] for r in deadletters.list_letters(redis_client, subject="DoomedEvent")] == [
        first, second]
    assert [r["id"] for r in deadletters.list_letters(redis_client, pool="flaky")] == [
        first, third]
    assert [r["id"] for r in deadletters.list_letters(redis_client, "DoomedEvent", "vrops")] == [
        second]
    assert deadletters.counts(redis_client) == {
        ("DoomedEvent", "flaky"): 1, ("DoomedEvent", "vrops"): 1, ("OtherEvent", "flaky"): 1}
    assert deadletters.depth(redis_client) == 3
    with pytest.raises(NoSuchDeadLetter, match="no dead letter 'nope'"):
        deadletters.get(redis_client, "nope")


def test_purge_some_or_all(redis_client: redis.Redis) -> None:
    first, second, third = (add(redis_client) for _ in range(3))
    other = add(redis_client, "OtherEvent")
    assert deadletters.purge(redis_client, [first, "nope", first]) == 1
    assert deadletters.depth(redis_client) == 3
    assert deadletters.counts(redis_client) == {("DoomedEvent", "flaky"): 2,
                                                ("OtherEvent", "flaky"): 1}
    assert deadletters.purge(redis_client, [other]) == 1
    assert deadletters.counts(redis_client) == {("DoomedEvent", "flaky"): 2}
    assert deadletters.purge(redis_client) == 2
    assert deadletters.depth(redis_client) == 0 and deadletters.counts(redis_client) == {}
    assert {second, third}.isdisjoint(r["id"] for r in deadletters.list_letters(redis_client))


def test_replay_sends_a_first_attempt_to_the_pool_then_removes_the_record(
        celery_app: Celery, redis_client: redis.Redis) -> None:
    event = flaky.structured_event("DoomedEvent")
    letter_id = add(redis_client, event=event)
    [task_id] = deadletters.replay(Publisher(celery_app), redis_client, letter_id)
    [message] = flaky.queued(redis_client, "flaky")
    assert message["headers"]["task"] == "DoomedEvent"
    assert task_id.startswith(f"{event['id']}:flaky:replay-")
    assert message["headers"]["id"] == task_id
    assert message["kwargs"] == {"event": event, "pool": "flaky", "functions": ["doomed"]}
    assert deadletters.depth(redis_client) == 0 and deadletters.counts(redis_client) == {}
    with pytest.raises(NoSuchDeadLetter):
        deadletters.replay(Publisher(celery_app), redis_client, letter_id)


def test_a_replay_the_broker_did_not_take_keeps_the_dead_letter(
        redis_client: redis.Redis) -> None:
    letter_id = add(redis_client)
    unreachable = create_app(broker_url="redis://127.0.0.1:1/0")
    unreachable.conf.update(task_publish_retry=False,  # fail at once, not after ~6 s
                            broker_transport_options={"max_retries": 1, "interval_start": 0})
    try:
        with pytest.raises(OperationalError):
            deadletters.replay(Publisher(unreachable), redis_client, letter_id)
    finally:
        unreachable.close()
    assert deadletters.get(redis_client, letter_id)["id"] == letter_id


def test_a_message_that_was_never_a_task_call_is_not_replayable(
        celery_app: Celery, redis_client: redis.Redis) -> None:
    no_event = deadletters.add(redis_client, task_name="GoodEvent", pool="flaky", function=None,
                               event=None, error=ValueError("undecodable"), attempt=1)
    no_pool = deadletters.add(redis_client, task_name="GoodEvent", pool=None, function=None,
                              event={"x": 1}, error=ValueError("no pool"), attempt=1)
    for letter_id in (no_event, no_pool):
        with pytest.raises(NotReplayable, match="purge it"):
            deadletters.replay(Publisher(celery_app), redis_client, letter_id)
    assert deadletters.depth(redis_client) == 2


def test_dead_lettered_crosses_from_a_prefork_child_intact() -> None:
    error = pickle.loads(pickle.dumps(DeadLettered("dead letter abc: boom", ["abc"])))
    assert str(error) == "dead letter abc: boom" and error.letter_ids == ("abc",)


# --- a real worker and poison messages


@pytest.fixture
def flaky_worker(redis_url: str, tmp_path: Path, log_dir: Path) -> Iterator[Proc]:
    worker = start_worker("flaky", flaky.worker_env(redis_url, tmp_path), log_dir,
                          name="worker-flaky", extra=flaky.QUICK_START)
    yield worker
    worker.stop()


def publish_raw(app: Celery, body: Any, headers: dict[str, Any] | None, **options: Any) -> None:
    """Publish a message that did not come from ``send_task``."""
    queue = queue_for("flaky")
    with app.connection_for_write() as connection:
        connection.Producer().publish(body, exchange=queue.exchange, routing_key="flaky",
                                      declare=[queue], headers=headers, **options)


@pytest.mark.slow
def test_poison_messages_are_dead_lettered_and_the_worker_keeps_going(
        flaky_worker: Proc, celery_app: Celery, redis_client: redis.Redis) -> None:
    good = flaky.structured_event("GoodEvent")
    flaky_queue = queue_for("flaky")

    def send(subject: str, **options: Any) -> None:
        celery_app.send_task(subject, queue=flaky_queue, **options)

    send("GoodEvent", kwargs={"foo": 1})  # garbage kwargs: no event, no pool
    send("GoodEvent", kwargs={"event": good})  # missing pool
    send("GoodEvent", kwargs={"event": good, "pool": "nope"})  # unknown pool
    send("GoodEvent", kwargs={"event": {"hello": "world"}, "pool": "flaky"})  # not a CloudEvent
    send("GoodEvent", kwargs={"event": 42, "pool": "flaky"})
    send("GoodEvent", kwargs={"event": good, "pool": "flaky", "attempt": "two"})
    send("GoodEvent", args=[1, 2, 3])  # arguments the task cannot even be called with
    publish_raw(celery_app, b"\xffnot json{", content_type="application/json",
                content_encoding="utf-8",
                headers={"lang": "py", "task": "GoodEvent", "id": str(uuid.uuid4())})
    publish_raw(celery_app, {"hello": "world"}, headers=None)  # not a task message at all
    flaky.send(celery_app, "GoodEvent")

    wait_until(lambda: redis_client.llen(flaky.successes_key("good")) == 1, 30,
               "the good message after the poison")
    wait_until(lambda: deadletters.depth(redis_client) == 9, 10, "nine dead letters")
    assert flaky_worker.popen.poll() is None

    letters = deadletters.list_letters(redis_client)
    errors = [f"{r['exception']}: {r['error']}" for r in letters]
    assert errors[0] == "PoisonMessage: message names no pool (pool=None)"
    assert errors[1] == "PoisonMessage: message names no pool (pool=None)"
    assert errors[2].startswith("PoisonMessage: unknown pool 'nope'")
    assert errors[3].startswith("PoisonMessage: invalid CloudEvent")
    assert errors[4] == "PoisonMessage: event must be a structured CloudEvent, got int"
    assert errors[5] == "PoisonMessage: attempt must be a whole number ≥ 1, got 'two'"
    assert errors[6].startswith("PoisonMessage: a vebaq task takes keyword arguments only")
    assert errors[7].startswith("DecodeError:")
    assert errors[8] == "PoisonMessage: not a Celery task message (no task headers)"
    assert [r["event"] for r in letters[1:3]] == [good, good]
    assert letters[6]["message"]["args"] == [1, 2, 3] and letters[6]["pool"] == "flaky"
    assert letters[7]["message"]["body"] == "base64:" + base64.b64encode(b"\xffnot json{").decode()
    assert letters[7]["message"]["headers"]["task"] == "GoodEvent"
    assert json.loads(letters[8]["message"]["body"]) == {"hello": "world"}
    assert all(r["attempts"] == 1 and r["function"] is None for r in letters)
