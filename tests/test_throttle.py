"""Throttling per key (vebaq.core.throttle) on a real Redis: modes, idempotent decisions across
a crash, batches that fill or fall due, and the configuration's errors."""

from __future__ import annotations

import pytest
import redis

from vebaq.core.config import _build, parse_duration
from vebaq.core.envelope import from_structured
from vebaq.core.errors import ConfigError
from vebaq.core.routing import Trigger, parse_path, parse_throttle
from vebaq.core.throttle import BATCH_TYPE, BATCHED, DROP, FIRED, PASS, Candidate, ThrottleStore

MINUTE = 60_000


def trigger(mode: str, value: object, **extra: object) -> Trigger:
    raw = {"key": "data.Host.Host.Value", mode: value, **extra}
    return Trigger(f"t-{mode}", "echo", throttle=parse_throttle(raw, "t", parse_duration))


def event(n: int, host: str) -> dict:
    return {"specversion": "1.0", "id": f"id-{n}", "source": "https://vc/sdk",
            "type": "com.vmware.event.router/event", "subject": "AlarmStatusChangedEvent",
            "time": "2026-01-01T00:00:00Z", "vcenteruuid": "uuid-a",
            "data": {"Key": n, "Host": {"Host": {"Type": "HostSystem", "Value": host}}}}


def candidates(t: Trigger, timeline: list[tuple[int, str]]) -> list[Candidate]:
    """(minute, host) → candidates with ids in order."""
    return [Candidate(t, event(i, host), minute * MINUTE) for i, (minute, host) in
            enumerate(timeline)]


@pytest.fixture
def store(redis_client: redis.Redis) -> ThrottleStore:
    return ThrottleStore(redis_client, "uuid-a")


def test_once_within_the_first_per_key_then_none_for_the_window(store: ThrottleStore) -> None:
    t = trigger("once_within", "5m")
    timeline = [(0, "h1"), (1, "h1"), (1, "h2"), (4, "h1"), (5, "h1"), (6, "h2"), (9, "h1"),
                (10, "h1")]
    assert store.decide(candidates(t, timeline)) == [
        PASS, DROP, PASS, DROP, PASS, PASS, DROP, PASS]


def test_once_after_only_after_a_quiet_period(store: ThrottleStore) -> None:
    t = trigger("once_after", "5m")
    # h1 chatters every 3 minutes: never quiet for 5, so only its first passes.
    timeline = [(0, "h1"), (3, "h1"), (6, "h1"), (9, "h1"), (15, "h1"), (16, "h2")]
    assert store.decide(candidates(t, timeline)) == [PASS, DROP, DROP, DROP, PASS, PASS]


def test_decisions_are_the_same_when_a_crashed_producer_decides_again(
        store: ThrottleStore) -> None:
    """Decided, then killed before the enqueue: the same events read again get the same
    decisions (not: the first of each window suppressed by its own earlier pass)."""
    t = trigger("once_within", "5m")
    batch = candidates(t, [(0, "h1"), (1, "h1"), (7, "h1"), (8, "h1")])
    first = store.decide(batch)
    assert first == [PASS, DROP, PASS, DROP]
    assert store.decide(batch) == first  # the crash: nothing settled
    store.settle(batch, [])
    later = candidates(t, [(0, "h1"), (9, "h1"), (13, "h1")])
    later = [Candidate(t, {**c.event, "id": f"later-{i}"}, c.created_ms)
             for i, c in enumerate(later)]
    # State survives the settle: 9 and 13 are within 5 minutes of the pass at 7 and 13 ≥ 12.
    assert store.decide(later) == [PASS, DROP, PASS]


def test_a_batch_fills_and_one_task_carries_its_events(store: ThrottleStore) -> None:
    t = trigger("batch", 3, within="10m")
    timeline = [(0, "h1"), (0, "h2"), (1, "h1"), (2, "h1"), (3, "h1")]
    batch = candidates(t, timeline)
    assert store.decide(batch) == [BATCHED, BATCHED, BATCHED, FIRED, BATCHED]
    assert store.decide(batch) == [BATCHED, BATCHED, BATCHED, FIRED, BATCHED]  # again: same
    [full] = store.firing()
    assert (full.trigger, full.pool, full.key) == ("t-batch", "echo", "h1")
    assert [e["id"] for e in full.events] == ["id-0", "id-2", "id-3"]
    cloudevent = full.cloudevent()
    parsed = from_structured(cloudevent)  # a valid CloudEvent for the workers
    assert parsed.get_type() == BATCH_TYPE and parsed.get_subject() == "AlarmStatusChangedEvent"
    assert parsed.get_extension("vebaqtrigger") == "t-batch"
    assert cloudevent["data"]["Count"] == 3 and cloudevent["data"]["Key"] == "h1"
    assert cloudevent["id"] == full.cloudevent()["id"]  # deterministic: duplicates dedupe
    store.settle(batch, [full])
    assert store.firing() == []
    # h1 holds one event (minute 3), h2 one (minute 0): both fall due 10 minutes after.
    assert store.flush_due(9 * MINUTE) == 0
    assert store.flush_due(10 * MINUTE) == 1
    assert [(b.key, len(b.events)) for b in store.firing()] == [("h2", 1)]
    assert store.flush_due(13 * MINUTE) == 1
    assert sorted((b.key, len(b.events)) for b in store.firing()) == [("h1", 1), ("h2", 1)]


def test_a_partial_batch_falls_due_after_within(store: ThrottleStore) -> None:
    t = trigger("batch", 10, within="10m")
    store.decide(candidates(t, [(0, "h1"), (1, "h1")]))
    assert store.flush_due(9 * MINUTE) == 0
    assert store.flush_due(10 * MINUTE) == 1
    [due] = store.firing()
    assert [e["id"] for e in due.events] == ["id-0", "id-1"]


def test_state_is_shared_by_producers_of_other_vcenters(redis_client: redis.Redis) -> None:
    t = trigger("once_within", "5m")
    a, b = ThrottleStore(redis_client, "uuid-a"), ThrottleStore(redis_client, "uuid-b")
    assert a.decide(candidates(t, [(0, "h1")])) == [PASS]
    other = Candidate(t, {**event(9, "h1"), "id": "b-1"}, 1 * MINUTE)
    assert b.decide([other]) == [DROP]


def test_a_key_of_several_paths_and_a_missing_value() -> None:
    throttle = parse_throttle({"key": ["vcenteruuid", "data.Host.Host.Value"],
                               "once_within": "1m"}, "t", parse_duration)
    assert throttle.keys == (parse_path("vcenteruuid", "k"),
                             parse_path("data.Host.Host.Value", "k"))
    assert throttle.key_of(event(1, "h1")) == "uuid-a|h1"
    assert throttle.key_of({"data": {}}) == "-|-"


@pytest.mark.parametrize(("throttle", "message"), [
    ({"once_within": "5m"}, "triggers[0].throttle.key: missing"),
    ({"key": "data.Host..Value", "once_within": "5m"}, "triggers[0].throttle.key: bad path"),
    ({"key": "data.X", "once_within": "5m", "once_after": "1m"}, "exactly one of once_within"),
    ({"key": "data.X"}, "exactly one of once_within, once_after, batch"),
    ({"key": "data.X", "once_within": "soon"}, "throttle.once_within: expected a duration"),
    ({"key": "data.X", "once_within": 0}, "throttle.once_within: must be > 0"),
    ({"key": "data.X", "batch": 1}, "throttle.batch: expected a whole number of events ≥ 2"),
    ({"key": "data.X", "batch": "10"}, "throttle.batch: expected a whole number"),
    ({"key": "data.X", "once_within": "5m", "within": "1m"}, "throttle.within: only for batch"),
    ({"key": "data.X", "oncewithin": "5m"}, "throttle.oncewithin: unknown key"),
    ({"key": [], "once_within": "5m"}, "throttle.key: expected a path or a non-empty list"),
    ("5m", "triggers[0].throttle: expected a mapping"),
])
def test_throttle_config_errors_are_one_line(throttle: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _build({"triggers": [{"pool": "echo", "throttle": throttle}]}, {})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_throttled_trigger_needs_a_name_of_its_own() -> None:
    with pytest.raises(ConfigError, match=r"triggers\[1\].name: 'x' is used by another"):
        _build({"triggers": [{"name": "x", "pool": "echo"},
                             {"name": "x", "pool": "echo",
                              "throttle": {"key": "data.X", "once_within": "1m"}}]}, {})
