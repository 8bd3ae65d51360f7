"""The structured form built without the SDK's JSON round trip (``to_structured(json_data=True)``,
the producer's path) is the SDK's, for every event class, any event, and the unusual cases that
must still take the SDK's way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyVmomi import vim

from producer.cloudevent import MalformedEvent, to_cloudevent
from tests.test_cloudevent import CREATED, EVENT_CLASSES, SOURCE, VC_UUID, populate
from tests.test_properties import vcenter_events
from vebaq.core.envelope import to_structured


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_every_event_class_gives_the_sdks_structured_form(cls: type) -> None:
    event = populate(cls)
    event.key, event.createdTime = 7, CREATED
    cloudevent = to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID, api_version="8.0.3")
    assert to_structured(cloudevent, json_data=True) == to_structured(cloudevent)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=vcenter_events(), style=st.sampled_from(["router", "vsphere"]))
def test_any_event_gives_the_sdks_structured_form(event: vim.event.Event, style: str) -> None:
    try:
        cloudevent = to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID,
                                   api_version="8.0", type_style=style)
    except MalformedEvent:
        return
    assert to_structured(cloudevent, json_data=True) == to_structured(cloudevent)


def base(**extra: object) -> dict[str, object]:
    return {"id": "e-1", "source": SOURCE, "type": "t", "subject": "s", **extra}


@pytest.mark.parametrize("event", [
    CloudEvent(base(datacontenttype="application/octet-stream"), b"\x00\xffbytes"),
    CloudEvent(base(datacontenttype="text/plain"), {"not": "json"}),
    CloudEvent(base(datacontenttype="application/vnd.x+json"), "a JSON text"),
    CloudEvent(base(time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)), {"a": [1, 2.5, None]}),
    CloudEvent(base(time=datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=timezone(timedelta(hours=2))),
                    seen=datetime(2026, 1, 1, tzinfo=UTC), count=3, flag=True), None),
], ids=["binary", "text-plain", "json-suffix-text", "utc-time", "extensions-no-data"])
def test_unusual_events_come_out_as_the_sdk_writes_them(event: CloudEvent) -> None:
    assert to_structured(event, json_data=True) == to_structured(event)
