"""Property-based tests (hypothesis): conversion of any event, and config loading of any input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyVmomi import vim

from producer.cloudevent import MalformedEvent, to_cloudevent
from vebaq.core import config
from vebaq.core.envelope import from_structured, to_structured
from vebaq.core.errors import ConfigError
from vebaq.core.subjects import event_classes

EVENT_CLASSES = event_classes()
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
# Huge messages: a short random text repeated (hypothesis cannot draw 100k-character strings).
huge_texts = st.builds(lambda part, times: part * times,
                       st.text(alphabet="ab✓\u0000\n\"'<>&\\", min_size=1, max_size=20),
                       st.integers(min_value=5_000, max_value=20_000))
times = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                     timezones=st.just(UTC))


@st.composite
def vcenter_events(draw: st.DrawFn) -> vim.event.Event:
    cls = draw(st.sampled_from(EVENT_CLASSES))
    event = cls()
    event.key = draw(st.integers(min_value=0, max_value=2**31 - 1))
    if draw(st.booleans()):
        event.createdTime = draw(times)
    if draw(st.booleans()):
        event.userName = draw(texts)
    event.fullFormattedMessage = draw(st.one_of(st.none(), texts, huge_texts))
    if draw(st.booleans()):
        event.host = vim.event.HostEventArgument(name=draw(texts),
                                                 host=vim.HostSystem(draw(st.text(
                                                     alphabet="host-0123456789", min_size=1))))
    if isinstance(event, vim.event.EventEx | vim.event.ExtendedEvent):
        event.eventTypeId = draw(texts)  # required by pyvmomi; may be empty
    return event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=vcenter_events(), vc_uuid=st.uuids().map(str),
       style=st.sampled_from(["router", "vsphere"]))
def test_any_event_converts_to_a_valid_cloudevent_that_round_trips(event: vim.event.Event,
                                                                   vc_uuid: str,
                                                                   style: str) -> None:
    try:
        cloudevent = to_cloudevent(event, source="https://vc/sdk", instance_uuid=vc_uuid,
                                   api_version="8.0", type_style=style)
    except MalformedEvent:
        return  # refused by name is fine; half-converted is not
    structured = to_structured(cloudevent)
    text = json.dumps(structured)  # plain JSON, whatever the message held
    again = from_structured(text)
    assert again.get_id() == cloudevent.get_id()
    assert again.get_data() == structured["data"]
    assert structured["subject"]
    assert structured["data"]["Key"] == event.key
    # Unset, an optional string is "" (VEBA's rule, see tests/test_veba_fidelity.py).
    assert structured["data"]["FullFormattedMessage"] == (event.fullFormattedMessage or "")


config_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children,
                                                                      max_size=3),
    max_leaves=8)
sections = st.sampled_from(["broker", "vcenter", "vrops", "cloudevents", "triggers", "pools",
                            "functions", "unknown", "vcenter.checkpoint"])


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(sections, config_values, max_size=4))
def test_any_config_loads_or_fails_with_one_line_naming_a_key(tmp_path_factory,
                                                              document: dict) -> None:
    path: Path = tmp_path_factory.mktemp("cfg") / "vebaq.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        settings_ = config.load(path, environ={}, known_pools={"echo", "vrops"})
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ")
        assert "\n" not in message and "Traceback" not in message
        return
    assert isinstance(settings_, config.Settings)


@settings(max_examples=200, deadline=None)
@given(payload=st.one_of(texts, st.binary(max_size=300), config_values.map(json.dumps)))
def test_garbage_payloads_are_refused_with_a_value_error(payload: str | bytes) -> None:
    try:
        from_structured(payload)
    except ValueError:
        return
    # Whatever parsed must be a real CloudEvent with the required attributes.
    parsed = json.loads(payload)
    assert all(parsed.get(name) for name in ("specversion", "id", "source", "type"))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children,
                                                                      max_size=4),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(event=st.one_of(json_values, st.binary(max_size=100), st.fixed_dictionaries(
           {"specversion": st.just("1.0"), "id": texts, "source": texts, "type": texts},
           optional={"data": json_values, "time": texts, "subject": texts})),
       pool=st.one_of(st.none(), texts, st.integers(), st.just("echo")))
def test_any_task_payload_is_either_a_cloudevent_for_a_pool_or_poison(event: object,
                                                                      pool: object) -> None:
    from workers.errors import PoisonMessage
    from workers.execution import parse_message
    from workers.pools import load_functions

    load_functions()
    try:
        message, cloudevent = parse_message("GeneralUserEvent", {"event": event, "pool": pool})
    except PoisonMessage as exc:
        assert str(exc) and "\n" not in str(exc)  # dead-lettered with a one-line reason
        return
    assert message.pool == pool == "echo"
    assert cloudevent.get_id() and cloudevent.get_source() and cloudevent.get_type()
