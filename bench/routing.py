"""Routing cost per event with 20 triggers: data-field filters against attribute-only ones.

Three trigger sets route the same simulated CloudEvents (maintenance mode, VM power, logins):

* ``attributes``: 20 triggers on CloudEvent attributes only (``subject`` exact/any, ``type``
  prefix, ``not``), what Knative can express — the baseline;
* ``data``: 20 triggers that also look into the data (host and VM names, the datacenter's
  moref, the user, a regex on the VM name, numeric on the key, exists), the same shapes users
  asked VEBA for;
* ``attributes, per-call dispatch``: the attribute set matched the way routing worked before
  filters were compiled (the dialect looked up on every call), for the cost of compiling.

Also the throttle's decision in Redis (one Lua call per batch) per event, against enqueueing
the same events' tasks: what a throttled trigger adds to the producer's step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bench import events, redisdb
from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from vebaq.core.config import parse_duration
from vebaq.core.publish import Publisher
from vebaq.core.routing import Filter, Trigger, parse_filter, parse_throttle, route
from vebaq.core.throttle import Candidate, ThrottleStore
from workers.app import create_app

#: Events routed per repeat (cycled through the simulated sample).
EVENTS = 20_000
SAMPLE = 2_000

SUBJECTS = ["VmPoweredOnEvent", "VmPoweredOffEvent", "EnteredMaintenanceModeEvent",
            "ExitMaintenanceModeEvent", "UserLoginSessionEvent"]


def attribute_triggers() -> list[dict]:
    """20 triggers on attributes only."""
    triggers = []
    for i in range(20):
        subject = SUBJECTS[i % len(SUBJECTS)]
        shape = i % 4
        if shape == 0:
            filters = [{"exact": {"subject": subject}}]
        elif shape == 1:
            filters = [{"any": [{"exact": {"subject": subject}},
                                {"exact": {"subject": SUBJECTS[(i + 1) % len(SUBJECTS)]}}]}]
        elif shape == 2:
            filters = [{"prefix": {"type": "com.vmware.event.router/"}},
                       {"exact": {"subject": subject}}]
        else:
            filters = [{"not": {"exact": {"subject": subject}}}, {"suffix": {"subject": "Event"}}]
        triggers.append({"pool": f"p{i}", "filters": filters})
    return triggers


def data_triggers() -> list[dict]:
    """20 triggers that look into the data."""
    shapes = [
        lambda i: [{"exact": {"subject": "EnteredMaintenanceModeEvent",
                              "data.Host.Name": f"esx0{i % 4}.lab.local"}}],
        lambda i: [{"exact": {"subject": "VmPoweredOffEvent"}},
                   {"prefix": {"data.Vm.Name": f"vm-{i % 10}"}}],
        lambda i: [{"regex": {"data.Vm.Name": f"^vm-{i % 10}[0-9]*$"}}],
        lambda i: [{"exact": {"data.UserName": "VSPHERE.LOCAL\\Administrator"}},
                   {"exact": {"subject": "UserLoginSessionEvent"}}],
        lambda i: [{"numeric": {"data.Key": {">": i * 100, "<=": i * 100 + 5000}}}],
        lambda i: [{"exists": {"data.Vm": True}},
                   {"any": [{"exact": {"data.Host.Host.Value": f"host-{10 + i % 4}"}},
                            {"suffix": {"data.Host.Name": "01.lab.local"}}]}],
        lambda i: [{"not": {"exact": {"data.Datacenter.Name": "dc-0"}}},
                   {"exact": {"subject": SUBJECTS[i % len(SUBJECTS)]}}],
    ]
    return [{"pool": f"p{i}", "filters": shapes[i % len(shapes)](i)} for i in range(20)]


def build(raw: list[dict]) -> list[Trigger]:
    return [Trigger(f"t{i}", t["pool"], tuple(parse_filter(f, f"t{i}") for f in t["filters"]))
            for i, t in enumerate(raw)]


# --- routing as it was before filters were compiled: the dialect dispatched on every call

_STRING_TESTS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda value, expected: value == expected,
    "prefix": str.startswith,
    "suffix": str.endswith,
}


def _dispatching_match(node: Filter, event: Mapping[str, Any]) -> bool:
    if node.dialect in _STRING_TESTS:
        test = _STRING_TESTS[node.dialect]
        return all(isinstance(event.get(name), str) and test(event[name], expected)
                   for name, expected in node.attributes)
    if node.dialect == "any":
        return any(_dispatching_match(child, event) for child in node.children)
    if node.dialect == "all":
        return all(_dispatching_match(child, event) for child in node.children)
    return not _dispatching_match(node.children[0], event)


def dispatching_route(triggers: Iterable[Trigger], event: Mapping[str, Any]) -> list[str]:
    pools: list[str] = []
    for trigger in triggers:
        if trigger.pool not in pools and all(_dispatching_match(f, event)
                                             for f in trigger.filters):
            pools.append(trigger.pool)
    return pools


def _per_event_us(router: Callable[[list[Trigger], Mapping[str, Any]], list[str]],
                  triggers: list[Trigger], sample: list[dict], count: int) -> tuple[float, int]:
    routed = 0
    started = time.perf_counter()
    for i in range(count):
        routed += len(router(triggers, sample[i % len(sample)]))
    return (time.perf_counter() - started) / count * 1e6, routed


def _vary(sample: list[dict]) -> list[dict]:
    """Give the simulated events VM names and a datacenter, as real ones have."""
    for i, event in enumerate(sample):
        data = event["data"]
        if data.get("Vm") is not None:
            data["Vm"]["Name"] = f"vm-{i % 97}"
        if data.get("Host") is not None:
            data["Datacenter"] = {"Name": f"dc-{i % 2}",
                                  "Datacenter": {"Type": "Datacenter", "Value": "datacenter-2"}}
    return sample


def _throttle(redis_url: str, sample: list[dict], repeats: int) -> dict[str, Any]:
    """Deciding ``once_within`` per host for a batch of events, against publishing them."""
    r = redisdb.connect(redis_url)
    throttle = parse_throttle({"key": "data.Host.Host.Value", "once_within": "5m"}, "t",
                              parse_duration)
    trigger = Trigger("bench-throttle", "bench-throttle", throttle=throttle)
    batch = sample[:1000]
    candidates = [Candidate(trigger, e, 1_700_000_000_000 + i * 1000)
                  for i, e in enumerate(batch)]
    publisher = Publisher(create_app(broker_url=redis_url))
    messages = events.outgoing(batch, "bench-throttle")
    decide, publish = [], []
    for _ in range(repeats):
        redisdb.flush(r)
        store = ThrottleStore(r, "bench")
        started = time.perf_counter()
        store.decide(candidates)
        decide.append((time.perf_counter() - started) / len(batch) * 1e6)
        store.settle(candidates, [])
        started = time.perf_counter()
        publisher.publish(messages)
        publish.append((time.perf_counter() - started) / len(batch) * 1e6)
    redisdb.flush(r)
    return {"events": len(batch), "decide_us_per_event": summary(decide),
            "publish_us_per_event": summary(publish),
            "ratio_decide_to_publish": paired_ratio(decide, publish)}


def measure(profile: Profile, redis_url: str) -> dict[str, Any]:
    sample = _vary(events.simulated_cloudevents(SAMPLE))
    count = EVENTS if profile.name == "full" else EVENTS // 4
    attributes, data = build(attribute_triggers()), build(data_triggers())
    # The same routing either way: compiled and dispatching agree on every event.
    for event in sample:
        if route(attributes, event) != dispatching_route(attributes, event):
            raise AssertionError(f"compiled and dispatching routing disagree on {event['id']}")
    timings: dict[str, list[float]] = {"attributes": [], "data": [], "dispatching": []}
    routed: dict[str, int] = {}
    for _ in range(profile.repeats):
        for name, router, triggers in (("attributes", route, attributes),
                                       ("data", route, data),
                                       ("dispatching", dispatching_route, attributes)):
            per_event, routed[name] = _per_event_us(router, triggers, sample, count)
            timings[name].append(per_event)
    return {
        "triggers": 20, "events": count,
        "tasks_per_event": {name: round(n / count, 2) for name, n in routed.items()},
        "us_per_event": {name: summary(runs) for name, runs in timings.items()},
        "ratio_data_to_attributes": paired_ratio(timings["data"], timings["attributes"]),
        "ratio_compiled_to_dispatching": paired_ratio(timings["attributes"],
                                                      timings["dispatching"]),
        "throttle": _throttle(redis_url, sample, profile.repeats),
    }
