"""Filters pushed down to vCenter (producer.pushdown): never an event less than the triggers want.

Three layers: the property (routing with and without pushdown agrees on every generated event,
for generated triggers), the model of vCenter's filter checked against the test peer on real
events, and the reader on the peer with a pushed-down filter (no false stalls, no false
"skipped" for the keys between matching events).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyVmomi import vim

from producer.cloudevent import to_cloudevent
from producer.pushdown import Pushdown, pushdown_for
from producer.reader import STALL_POLLS, EventReader, SeenKeys
from tests.support import Simulator, VCenter, build_vcsim, drain
from vebaq.core.envelope import to_structured
from vebaq.core.routing import DEFAULT_TRIGGERS, Trigger, parse_filter, route

SOURCE, UUID = "https://vc-a/sdk", "uuid-a"
SUBJECTS = ["VmPoweredOnEvent", "VmPoweredOffEvent", "EnteredMaintenanceModeEvent",
            "UserLoginSessionEvent", "com.example.Custom"]
USERS = ["alice", "bob", "VSPHERE.LOCAL\\carol", ""]
HOSTS, DATACENTERS, VMS = ["host-1", "host-2"], ["datacenter-2", "datacenter-3"], ["vm-1", "vm-2"]


def moref_arg(field: str, kind: str, value: str | None, name: str) -> dict | None:
    return None if value is None else {"Name": name, field: {"Type": kind, "Value": value}}


@st.composite
def events(draw: st.DrawFn, type_style: str) -> dict:
    subject = draw(st.sampled_from(SUBJECTS))
    vm = draw(st.sampled_from([None, *VMS]))
    return {
        "id": "x", "source": SOURCE, "vcenteruuid": UUID, "subject": subject,
        "type": (f"com.vmware.vsphere.{subject}.v0" if type_style == "vsphere" else
                 draw(st.sampled_from(["com.vmware.event.router/event",
                                       "com.vmware.event.router/eventex"]))),
        "data": {
            "Key": draw(st.integers(0, 300)),
            "UserName": draw(st.sampled_from(USERS)),
            "Datacenter": moref_arg("Datacenter", "Datacenter",
                                    draw(st.sampled_from([None, *DATACENTERS])), "dc"),
            "Host": moref_arg("Host", "HostSystem", draw(st.sampled_from([None, *HOSTS])), "esx"),
            "Vm": moref_arg("Vm", "VirtualMachine", vm, f"prod-{vm}" if vm else ""),
        },
    }


def exact_leaf() -> st.SearchStrategy[dict]:
    pairs = st.one_of(
        st.tuples(st.just("subject"), st.sampled_from([*SUBJECTS, "Other"])),
        st.tuples(st.just("type"), st.sampled_from(
            [f"com.vmware.vsphere.{s}.v0" for s in SUBJECTS] + ["com.vmware.event.router/event",
                                                              "com.vmware.vsphere..v0"])),
        st.tuples(st.just("source"), st.sampled_from([SOURCE, "https://vc-b/sdk"])),
        st.tuples(st.just("vcenteruuid"), st.sampled_from([UUID, "uuid-b"])),
        st.tuples(st.just("data.UserName"), st.sampled_from(USERS)),
        st.tuples(st.just("data.Host.Host.Value"), st.sampled_from(HOSTS)),
        st.tuples(st.just("data.Datacenter.Datacenter.Value"), st.sampled_from(DATACENTERS)),
        st.tuples(st.just("data.Vm.Vm.Value"), st.sampled_from(VMS)),
        st.tuples(st.just("data.Host.Name"), st.just("esx")),
    )
    return st.lists(pairs, min_size=1, max_size=3, unique_by=lambda p: p[0]).map(
        lambda items: {"exact": dict(items)})


LEAVES = st.one_of(
    exact_leaf(), exact_leaf(),  # the dialect pushdown understands, drawn more often
    st.builds(lambda p: {"prefix": {"data.Vm.Name": p}}, st.sampled_from(["prod-", "test-"])),
    st.builds(lambda b: {"exists": {"data.Vm": b}}, st.booleans()),
    st.builds(lambda n: {"numeric": {"data.Key": {">": n}}}, st.integers(0, 300)),
    st.just({"regex": {"data.UserName": "^b"}}),
)

FILTERS = st.recursive(LEAVES, lambda children: st.one_of(
    st.lists(children, min_size=1, max_size=3).map(lambda c: {"any": c}),
    st.lists(children, min_size=1, max_size=3).map(lambda c: {"all": c}),
    children.map(lambda c: {"not": c}),
), max_leaves=6)

TRIGGERS = st.lists(st.lists(FILTERS, max_size=3), min_size=1, max_size=5).map(
    lambda triggers: tuple(
        Trigger(f"t{i}", f"pool{i % 3}", tuple(parse_filter(f, f"t{i}") for f in filters))
        for i, filters in enumerate(triggers)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), type_style=st.sampled_from(["router", "vsphere"]))
def test_routing_with_and_without_pushdown_agrees_on_every_event(data: st.DataObject,
                                                                  type_style: str) -> None:
    """The correctness of pushdown: an event vCenter would not send (the model says so) is one
    no trigger routes anywhere."""
    triggers = data.draw(TRIGGERS, label="triggers")
    pushdown, why = pushdown_for(triggers, source=SOURCE, instance_uuid=UUID,
                                 type_style=type_style)
    for _ in range(20):
        event = data.draw(events(type_style), label="event")
        without = route(triggers, event)
        with_pushdown = without if pushdown is None or pushdown.admits(event) else []
        assert with_pushdown == without, (why, event)


def triggers(*filter_lists: list[dict]) -> tuple[Trigger, ...]:
    return tuple(Trigger(f"t{i}", "p", tuple(parse_filter(f, "f") for f in filters))
                 for i, filters in enumerate(filter_lists))


def pushed(*filter_lists: list[dict], type_style: str = "router") -> Pushdown | None:
    return pushdown_for(triggers(*filter_lists), source=SOURCE, instance_uuid=UUID,
                        type_style=type_style)[0]


def test_what_is_pushed_down_for_typical_triggers() -> None:
    assert pushdown_for(DEFAULT_TRIGGERS, source=SOURCE, instance_uuid=UUID,
                        type_style="router") == (None, "trigger 'echo' may match any event")
    assert pushed([{"any": [{"exact": {"subject": "EnteredMaintenanceModeEvent"}},
                            {"exact": {"subject": "ExitMaintenanceModeEvent"}}]}]) == Pushdown(
        subjects=("EnteredMaintenanceModeEvent", "ExitMaintenanceModeEvent"))
    # VEBA's Knative triggers filter on type: understood with cloudevents.type: vsphere.
    assert pushed([{"exact": {"type": "com.vmware.vsphere.VmPoweredOffEvent.v0"}}],
                  type_style="vsphere") == Pushdown(subjects=("VmPoweredOffEvent",))
    assert pushed([{"exact": {"type": "com.vmware.vsphere.VmPoweredOffEvent.v0"}}]) is None
    assert pushed([{"exact": {"data.Datacenter.Datacenter.Value": "datacenter-2"}}],
                  [{"exact": {"subject": "VmPoweredOnEvent",
                              "data.Datacenter.Datacenter.Value": "datacenter-2"}}]) == \
        Pushdown(entity=("Datacenter", "datacenter-2"))
    assert pushed([{"exact": {"subject": "UserLoginSessionEvent"}},
                   {"any": [{"exact": {"data.UserName": "alice"}},
                            {"exact": {"data.UserName": "bob"}}]}]) == \
        Pushdown(subjects=("UserLoginSessionEvent",), users=("alice", "bob"))
    # Two triggers that share nothing vCenter can filter by: everything is read.
    assert pushed([{"exact": {"subject": "A"}}], [{"exact": {"data.UserName": "bob"}}]) is None
    # A trigger for another vCenter does not widen this one's filter.
    assert pushed([{"exact": {"subject": "A"}}],
                  [{"exact": {"vcenteruuid": "uuid-b"}}]) == Pushdown(subjects=("A",))
    # not, prefix and the like say nothing vCenter can use.
    assert pushed([{"not": {"exact": {"subject": "A"}}}]) is None


# --- the model of vCenter's filter, against the test peer on real events

@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[str, VCenter]]:
    sim = Simulator(build_vcsim(), tmp_path)
    vcenter = VCenter(sim.url)
    yield sim.url, vcenter
    vcenter.close()
    sim.stop()


def post_variety(url: str, vcenter: VCenter) -> None:
    """Events of several classes, users and entities (users through sessions of their own:
    the simulator stamps the session's user on a posted event)."""
    datacenter = vcenter.content.rootFolder.childEntity[0]
    hosts = vcenter.hosts()
    vms = vcenter.vms()[:2]
    for user in ("alice", "bob"):
        client = VCenter(url, user=user)
        for host in hosts[:2]:
            client.maintenance(host, enter=True)
            client.maintenance(host, enter=False)
        for vm in vms:
            client.post(vim.event.VmPoweredOffEvent(
                vm=vim.event.VmEventArgument(vm=vm, name=vm.name),
                host=vim.event.HostEventArgument(host=vm.runtime.host, name=vm.runtime.host.name),
                datacenter=vim.event.DatacenterEventArgument(datacenter=datacenter,
                                                             name=datacenter.name)))
        client.post(vim.event.EventEx(eventTypeId="com.example.Custom", severity="info"))
        client.post(vim.event.GeneralUserEvent(message=f"from {user}"))
        client.close()


def read_all(vcenter: VCenter, spec: vim.event.EventFilterSpec) -> list[vim.event.Event]:
    collector = vcenter.content.eventManager.CreateCollectorForEvents(spec)
    try:
        collector.SetCollectorPageSize(1000)
        found = []
        while page := collector.ReadNextEvents(1000):
            found.extend(page)
        return found
    finally:
        collector.DestroyCollector()


def test_the_model_of_vcenters_filter_holds_on_the_peer(peer: tuple[str, VCenter]) -> None:
    url, vcenter = peer
    begin = vcenter.si.CurrentTime()
    post_variety(url, vcenter)
    since = vim.event.EventFilterSpec.ByTime(beginTime=begin)
    every = read_all(vcenter, vim.event.EventFilterSpec(time=since))
    structured = {e.key: to_structured(to_cloudevent(e, source=url, instance_uuid=UUID,
                                                     api_version="8.0")) for e in every}
    host = vcenter.hosts()[0]
    datacenter = vcenter.content.rootFolder.childEntity[0]
    cases = [
        (Pushdown(subjects=("EnteredMaintenanceModeEvent", "com.example.Custom")), True),
        (Pushdown(users=("alice",)), True),
        (Pushdown(subjects=("VmPoweredOffEvent",), users=("bob",)), True),
        (Pushdown(entity=("HostSystem", host._moId)), False),  # recursion all: more
        (Pushdown(entity=("Datacenter", datacenter._moId)), False),
    ]
    for pushdown, exact in cases:
        spec = vim.event.EventFilterSpec(time=since,
                                         **pushdown.spec_fields(vcenter.content.eventManager._stub))
        returned = {e.key for e in read_all(vcenter, spec)}
        admitted = {key for key, event in structured.items() if pushdown.admits(event)}
        print(f"\n[model vs peer] {pushdown.describe()}: peer returned {len(returned)}, model "
              f"admits {len(admitted)} of {len(structured)}")
        assert admitted, pushdown  # the case means something
        assert admitted <= returned, pushdown.describe()
        if exact:
            assert admitted == returned, pushdown.describe()


# --- the reader with a pushed-down filter

def new_reader(vcenter: VCenter, pushdown: Pushdown) -> EventReader:
    reader = EventReader(vcenter.content, begin=vcenter.si.CurrentTime(), seen=SeenKeys(),
                         pushdown=pushdown)
    reader.open()
    return reader


def chatter(vcenter: VCenter, count: int, label: str) -> None:
    for i in range(count):
        vcenter.post(vim.event.GeneralUserEvent(message=f"{label} {i}"))


def wanted(vcenter: VCenter, count: int, label: str) -> None:
    for i in range(count):
        vcenter.post(vim.event.EventEx(eventTypeId="com.example.Wanted", severity="info",
                                       message=f"{label} {i}"))


def got(events: list) -> list[str]:
    return [e.message for e in events if isinstance(e, vim.event.EventEx)]


def test_many_events_that_do_not_match_are_no_stall(peer: tuple[str, VCenter],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """vCenter's newest event is, again and again, one the filter excludes: the watchdog must
    not see a stall in that, nor the continuity check a loss in the key gaps."""
    _, vcenter = peer
    reader = new_reader(vcenter, Pushdown(subjects=("com.example.Wanted",)))
    with caplog.at_level(logging.INFO, logger="vebaq.producer"):
        read = []
        for round_ in range(5):
            chatter(vcenter, 40, f"noise {round_}")
            wanted(vcenter, 2, f"round {round_}")
            chatter(vcenter, 40, f"more noise {round_}")
            read += drain(reader, polls=STALL_POLLS + 2)
    assert got(read) == [f"round {r} {i}" for r in range(5) for i in range(2)]
    assert len(read) == 10  # only what matched crossed the network
    assert reader.resets == 0 and reader.stall is None and reader.skipped == 0
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []
    reader.close()


def test_a_stalled_pushed_down_collector_is_replaced_without_false_losses(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pushed-down collector goes stale (current govmomi, 30 matching events behind): the
    watchdog sees it in the collector's own latestPage, replaces it, and the keys between the
    matching events are not reported as skipped."""
    sim = Simulator(build_vcsim(), tmp_path, "-collector-capacity", "30")
    vcenter = VCenter(sim.url)
    try:
        reader = new_reader(vcenter, Pushdown(subjects=("com.example.Wanted",)))
        wanted(vcenter, 1, "warm-up")
        drain(reader, polls=1)
        for i in range(100):  # 100 matching events, each between non-matching ones
            chatter(vcenter, 2, f"noise {i}")
            wanted(vcenter, 1, f"burst {i}")
        with caplog.at_level(logging.INFO, logger="vebaq.producer"):
            read = drain(reader, polls=STALL_POLLS + 2)
        assert got(read) == [f"burst {i} 0" for i in range(100)]
        assert reader.resets >= 1 and reader.stall is None and reader.skipped == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        reader.close()
    finally:
        vcenter.close()
        sim.stop()


def test_an_entity_vcenter_does_not_know_falls_back_to_reading_everything(
        peer: tuple[str, VCenter], caplog: pytest.LogCaptureFixture) -> None:
    _, vcenter = peer
    with caplog.at_level(logging.WARNING, logger="vebaq.producer"):
        reader = new_reader(vcenter, Pushdown(entity=("HostSystem", "host-does-not-exist")))
    assert reader.pushdown is None
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("vCenter refused the pushed-down filter (ManagedObjectNotFound")
    chatter(vcenter, 3, "all of it")
    assert len(drain(reader, polls=STALL_POLLS + 1)) == 3
    reader.close()
