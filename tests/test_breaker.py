"""The poison breaker's delivery journal on a real Redis, one delivery at a time (the worker
processes that die are in ``tests/test_poison.py``)."""

from __future__ import annotations

import redis

from vebaq.core import done, keys
from workers.breaker import Delivery, exit_status, record_exit

FUNCTIONS = ("first", "second")


def deliver(r: redis.Redis, redelivered: bool = True, limit: int = 3) -> Delivery:
    return Delivery(r, "task-1", "pool", "event-1", FUNCTIONS, redelivered=redelivered,
                    limit=limit, ttl=60)


def test_a_first_delivery_writes_nothing_but_its_done_markers(redis_client: redis.Redis) -> None:
    delivery = deliver(redis_client, redelivered=False)
    assert not delivery.is_done("first") and not delivery.tripped("first")
    delivery.ended("first", "second", succeeded=True)
    delivery.ended("second", None, succeeded=False)
    assert redis_client.keys("vebaq:delivery:*") == []
    assert done.is_done(redis_client, "pool", "first", "event-1")
    assert not done.is_done(redis_client, "pool", "second", "event-1")


def test_a_redelivery_charges_the_first_function_not_done(redis_client: redis.Redis) -> None:
    done.mark_done(redis_client, "pool", "first", "event-1")  # the first delivery got this far
    delivery = deliver(redis_client)
    assert delivery.interrupted == {"second": 1} and delivery.is_done("first")
    assert redis_client.hget(keys.delivery("task-1"), "running") == b"second"


def test_after_limit_interruptions_the_function_trips_with_the_exit_status(
        redis_client: redis.Redis) -> None:
    record_exit(redis_client, "task-1", "signal 9 (SIGKILL)", ttl=60)
    for charged in (1, 2):  # each delivery dies while "first" runs
        assert deliver(redis_client).interrupted == {"first": charged}
    tripped = deliver(redis_client)
    assert tripped.tripped("first") and not tripped.tripped("second")
    assert str(tripped.poison("first")) == \
        "worker lost 3 times while running first: signal 9 (SIGKILL)"
    # The tripped function is not named running: the next one is.
    assert redis_client.hget(keys.delivery("task-1"), "running") == b"second"


def test_the_journal_follows_the_functions_and_goes_when_they_are_done(
        redis_client: redis.Redis) -> None:
    delivery = deliver(redis_client)
    delivery.ended("first", "second", succeeded=True)
    assert redis_client.hget(keys.delivery("task-1"), "running") == b"second"
    delivery.ended("second", None, succeeded=True)
    assert not redis_client.exists(keys.delivery("task-1"))
    again = deliver(redis_client)  # the worker died before the ack: all done, nothing charged
    assert again.interrupted == {} and again.is_done("first") and again.is_done("second")


def test_a_delivery_given_back_for_a_redis_failure_charges_nothing(
        redis_client: redis.Redis) -> None:
    deliver(redis_client, redelivered=False).abandon()
    assert deliver(redis_client).interrupted == {}
    unknown = deliver(redis_client)  # that one died while "first" ran, with no status known
    assert unknown.interrupted == {"first": 1} and unknown.exit_status is None


def test_the_exit_status_is_read_from_celerys_worker_lost_error() -> None:
    assert exit_status(Exception("Worker exited prematurely: signal 9 (SIGKILL) Job: 12.")) \
        == "signal 9 (SIGKILL)"
    assert exit_status(Exception("Worker exited prematurely: exitcode 1.")) == "exitcode 1"


def test_an_unnoticed_exit_does_not_replace_a_known_one(redis_client: redis.Redis) -> None:
    record_exit(redis_client, "task-1", "exitcode 1", ttl=60)
    record_exit(redis_client, "task-1", "the pool child died", ttl=60, known=False)
    assert redis_client.hget(keys.delivery("task-1"), "exit") == b"exitcode 1"
