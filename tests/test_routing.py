"""Trigger filters on CloudEvent attributes and on the event's data (vebaq.core.routing)."""

from __future__ import annotations

import time

import pytest
import yaml

from vebaq.core.config import _build
from vebaq.core.errors import ConfigError
from vebaq.core.routing import parse_filter, parse_path, route

#: A structured CloudEvent as the producer builds it (VEBA's data shape).
EVENT = {
    "id": "0b8c…", "source": "https://vc/sdk", "subject": "VmPoweredOffEvent",
    "type": "com.vmware.event.router/event", "eventclass": "event",
    "data": {
        "Key": 1234, "UserName": "VSPHERE.LOCAL\\alice", "Template": False,
        "Datacenter": {"Name": "dc-east", "Datacenter": {"Type": "Datacenter",
                                                         "Value": "datacenter-2"}},
        "Host": {"Name": "esx01.lab.local", "Host": {"Type": "HostSystem", "Value": "host-19"}},
        "Vm": {"Name": "prod-042", "Vm": {"Type": "VirtualMachine", "Value": "vm-77"}},
        "Ds": None,
        "Arguments": [{"Key": "a", "Value": "1"}],
        "FullFormattedMessage": "prod-042 on esx01.lab.local is powered off",
    },
}


def matches(raw: dict, event: dict = EVENT) -> bool:
    return parse_filter(raw, "f").matches(event)


@pytest.mark.parametrize("raw", [
    {"exact": {"data.Host.Name": "esx01.lab.local"}},
    {"exact": {"subject": "VmPoweredOffEvent", "data.Datacenter.Datacenter.Value": "datacenter-2"}},
    {"exact": {"data.Key": 1234}},
    {"exact": {"data.Key": 1234.0}},
    {"exact": {"data.Template": False}},
    {"exact": {"data.Arguments.0.Key": "a"}},
    {"prefix": {"data.Vm.Name": "prod-"}},
    {"suffix": {"data.Host.Name": ".lab.local"}},
    {"numeric": {"data.Key": {">": 100, "<=": 1234}}},
    {"numeric": {"data.Key": {"!=": 1}}},
    {"regex": {"data.Vm.Name": "^prod-[0-9]+$"}},
    {"regex": {"data.UserName": "(?i)alice$"}},
    {"exists": {"data.Vm": True}},
    {"exists": {"data.Ds": False}},
    {"exists": {"data.Nothing.Here": False}},
    {"any": [{"exact": {"data.Host.Name": "esx02"}}, {"prefix": {"data.Vm.Name": "prod"}}]},
    {"all": [{"exact": {"subject": "VmPoweredOffEvent"}}, {"exists": {"data.Host": True}}]},
    {"not": {"exact": {"data.UserName": "bob"}}},
])
def test_filters_on_data_that_match(raw: dict) -> None:
    assert matches(raw)


@pytest.mark.parametrize("raw", [
    {"exact": {"data.Host.Name": "esx02.lab.local"}},
    {"exact": {"data.Key": "1234"}},             # types are not coerced
    {"exact": {"data.Template": 0}},             # false is not 0
    {"exact": {"data.Key": True}},
    {"exact": {"data.Arguments.5.Key": "a"}},    # past the end of the list
    {"exact": {"data.Vm.Name.Deeper": "x"}},     # a field of a string
    {"prefix": {"data.Ds.Name": "x"}},           # a field of null
    {"prefix": {"data.Key": "12"}},              # prefix of a number
    {"numeric": {"data.Key": {"<": 100}}},
    {"numeric": {"data.Template": {"=": 0}}},    # a boolean is not a number
    {"numeric": {"data.Host.Name": {">": 0}}},
    {"regex": {"data.Vm.Name": "^test-"}},
    {"regex": {"data.Key": "1234"}},             # regex only on strings
    {"exists": {"data.Ds": True}},
    {"exists": {"data.Vm.Name": False}},
])
def test_filters_on_data_that_do_not_match(raw: dict) -> None:
    assert not matches(raw)


def test_attribute_filters_keep_knatives_semantics() -> None:
    assert matches({"exact": {"subject": "VmPoweredOffEvent"}})
    assert matches({"prefix": {"type": "com.vmware.event.router/"}})
    assert not matches({"exact": {"missing": "x"}})
    assert not matches({"exact": {"subject": "VmPoweredOff"}})


def test_a_path_through_a_mapping_that_is_not_a_dict() -> None:
    """Ingress and replays may hand over other Mapping types: resolved all the same."""
    from types import MappingProxyType
    event = {"data": MappingProxyType({"Host": MappingProxyType({"Name": "esx01"})})}
    assert matches({"exact": {"data.Host.Name": "esx01"}}, event)
    assert parse_path("data.Host.Name", "p").resolve(event) == "esx01"


def config_error(triggers: list) -> str:
    with pytest.raises(ConfigError) as error:
        _build({"triggers": triggers}, {})
    return str(error.value)


@pytest.mark.parametrize(("filters", "message"), [
    ([{"exact": {"data.Vm..Name": "x"}}],
     "triggers[0].filters[0].exact.data.Vm..Name: bad path (an empty field name)"),
    ([{"exact": {"data.": "x"}}], "triggers[0].filters[0].exact.data.: bad path"),
    ([{"exact": {"data": "x"}}], "exact.data: name a field inside the data"),
    ([{"prefix": {"data.Vm Name": "x"}}], "bad path (field 'Vm Name'"),
    ([{"exact": {"Subject": "x"}}], "exact.Subject: not a CloudEvent attribute"),
    ([{"exact": {"data.Key": None}}], "exact.data.Key: expected a string, a number or true"),
    ([{"exact": {"data.Key": [1, 2]}}], "exact.data.Key: expected a string, a number"),
    ([{"prefix": {"data.Key": 12}}], "prefix.data.Key: expected a string, got int"),
    ([{"numeric": {"data.Key": 100}}], "numeric.data.Key: expected a mapping of comparisons"),
    ([{"numeric": {"data.Key": {"~": 1}}}], "numeric.data.Key: unknown comparison '~'"),
    ([{"numeric": {"data.Key": {">": "1"}}}], "numeric.data.Key.>: expected a number"),
    ([{"numeric": {"data.Key": {">": True}}}], "numeric.data.Key.>: expected a number"),
    ([{"exists": {"data.Vm": "yes"}}], "exists.data.Vm: expected true or false"),
    ([{"regex": {"data.Vm.Name": "(a"}}], "regex.data.Vm.Name: bad regular expression '(a'"),
    ([{"regex": {"data.Vm.Name": r"(a)\1"}}], "no backreferences or look-arounds"),
    ([{"regex": {"data.Vm.Name": "(?=a)"}}], "regex.data.Vm.Name: bad regular expression"),
    ([{"regex": {"data.Vm.Name": "a" * 1001}}], "longer than 1000 characters"),
    ([{"any": [{"exact": {"subject": "x"}}, {"regex": {"data.X": "["}}]}],
     "triggers[0].filters[0].any[1].regex.data.X: bad regular expression"),
    ([{"exakt": {"subject": "x"}}], "unknown filter dialect 'exakt' (expected exact, prefix, "
                                    "suffix, numeric, regex, exists, any, all or not)"),
])
def test_config_errors_name_the_trigger_and_the_bad_path(filters: list, message: str) -> None:
    text = config_error([{"pool": "echo", "filters": filters}])
    assert message in text
    assert "\n" not in text


def test_errors_name_the_right_trigger_index() -> None:
    text = config_error([{"pool": "echo"}, {"pool": "echo"},
                         {"pool": "echo", "filters": [{"exact": {"subject": "x"}},
                                                      {"exact": {"data.Vm..Name": "x"}}]}])
    assert text.startswith("triggers[2].filters[1].exact.data.Vm..Name: bad path")


def test_a_config_file_with_data_filters_routes_on_data() -> None:
    settings = _build(yaml.safe_load("""
        triggers:
          - name: prod-off
            pool: tickets
            filters:
              - exact: {subject: VmPoweredOffEvent}
              - regex: {data.Vm.Name: "^prod-[0-9]+$"}
          - name: esx01
            pool: hosts
            filters: [{exact: {data.Host.Name: esx01.lab.local}}]
          - name: alice
            pool: audit
            filters: [{suffix: {data.UserName: "\\\\alice"}}]
    """), {})
    assert route(settings.triggers, EVENT) == ["tickets", "hosts", "audit"]
    other = {**EVENT, "data": {**EVENT["data"], "Vm": {"Name": "test-1"}, "UserName": "bob"}}
    assert route(settings.triggers, other) == ["hosts"]


def test_regex_matching_is_linear_even_for_catastrophic_patterns() -> None:
    """(a+)+$ backtracks exponentially in Python's re on 'aaaa…b'; RE2 is linear. Not a timing
    assertion on the machine: a bound so generous only exponential time could miss it."""
    text = "a" * 50_000 + "b"
    event = {"data": {"Vm": {"Name": text}}}
    started = time.monotonic()
    assert not matches({"regex": {"data.Vm.Name": "(a+)+$"}}, event)
    assert time.monotonic() - started < 5.0
