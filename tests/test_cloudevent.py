"""Event → CloudEvent conversion over every event class pyvmomi knows."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pyVmomi import VmomiSupport, vim

from producer.cloudevent import ROUTER_TYPES, MalformedEvent, event_id, pascal, to_cloudevent
from vebaq.core.envelope import KEY_EPOCH_ATTRIBUTE, from_structured, to_structured
from vebaq.core.subjects import event_classes

CREATED = datetime(2021, 5, 6, 16, 20, 5, 137999, tzinfo=UTC)
VC_UUID = "6ef4d9e4-4f7b-4c9e-9b3b-0f3c8a1d2e11"
SOURCE = "https://vc01.example.com/sdk"


def sample(value_type: type, depth: int = 0) -> object:
    """A non-empty value of a pyvmomi property type (enough to exercise the converter)."""
    if depth > 3:
        return None
    if issubclass(value_type, VmomiSupport.Array):
        item = sample(value_type.Item, depth + 1)
        return [item] if item is not None else []
    if issubclass(value_type, VmomiSupport.ManagedObject):
        return value_type("obj-7")
    if issubclass(value_type, VmomiSupport.DataObject):
        if value_type is VmomiSupport.DataObject or getattr(value_type, "_wsdlName", "") in (
                "DynamicData", "MethodFault"):
            return None
        return populate(value_type, depth + 1)
    if issubclass(value_type, bool):
        return True
    if issubclass(value_type, datetime):
        return CREATED
    if issubclass(value_type, int):
        return 42
    if issubclass(value_type, float):
        return 1.5
    if issubclass(value_type, VmomiSupport.Enum):
        return value_type.values[0] if getattr(value_type, "values", None) else None
    if issubclass(value_type, bytes):
        return b"\x00\x01binary"
    if issubclass(value_type, str):
        return "text ✓ <&> \"quoted\""
    return None


def populate(cls: type, depth: int = 0) -> VmomiSupport.DataObject:
    obj = cls()
    for prop in cls._GetPropertyList():
        if prop.name in ("dynamicType", "dynamicProperty"):
            continue
        try:
            value = sample(prop.type, depth)
            if value is not None:
                setattr(obj, prop.name, value)
        except (TypeError, ValueError):
            continue  # pyvmomi refuses some generated values; the field stays unset
    return obj


EVENT_CLASSES = event_classes()


def test_pyvmomi_knows_hundreds_of_event_classes() -> None:
    assert len(EVENT_CLASSES) > 300
    names = {cls.__name__.rsplit(".", 1)[-1] for cls in EVENT_CLASSES}
    assert {"EnteredMaintenanceModeEvent", "ExitMaintenanceModeEvent", "VmPoweredOnEvent",
            "EventEx", "ExtendedEvent", "UserLoginSessionEvent"} <= names


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_every_event_class_converts_and_round_trips(cls: type) -> None:
    event = populate(cls)
    event.key = 1234
    event.createdTime = CREATED
    cloudevent = to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID, api_version="8.0.3")
    structured = to_structured(cloudevent)

    # Structured JSON is plain JSON and parses back to the same event.
    text = json.dumps(structured)
    again = from_structured(text)
    assert again.get_attributes() == cloudevent.get_attributes()
    assert again.get_data() == structured["data"]

    name = cls.__name__.rsplit(".", 1)[-1]
    data = structured["data"]
    # Every property of the class is kept, PascalCased.
    expected = {pascal(p.name) for p in cls._GetPropertyList()} - {"DynamicType",
                                                                   "DynamicProperty"}
    assert set(data) == expected
    assert data["Key"] == 1234
    assert data["CreatedTime"] == "2021-05-06T16:20:05.137999Z"
    assert structured["time"] == "2021-05-06T16:20:05.137999Z"
    assert structured["id"] == event_id(VC_UUID, 1234)
    assert structured["source"] == SOURCE
    assert structured["vsphereapiversion"] == "8.0.3"
    assert structured["vcenteruuid"] == VC_UUID
    if isinstance(event, vim.event.EventEx):
        assert structured["subject"] == data["EventTypeId"]
        assert structured["type"] == ROUTER_TYPES["EventEx"]
    elif isinstance(event, vim.event.ExtendedEvent):
        assert structured["subject"] == data["EventTypeId"]
        assert structured["type"] == ROUTER_TYPES["ExtendedEvent"]
    else:
        assert structured["subject"] == name
        assert structured["type"] == "com.vmware.event.router/event"
        assert structured["eventclass"] == "event"


def test_data_has_the_shape_veba_functions_read() -> None:
    host = vim.HostSystem("host-19")
    event = vim.event.EnteredMaintenanceModeEvent(
        key=4711, chainId=4710, createdTime=CREATED, userName="VSPHERE.LOCAL\\Administrator",
        host=vim.event.HostEventArgument(name="esx01", host=host),
        datacenter=vim.event.DatacenterEventArgument(name="DC0",
                                                     datacenter=vim.Datacenter("datacenter-2")),
        computeResource=vim.event.ComputeResourceEventArgument(
            name="Cluster01", computeResource=vim.ClusterComputeResource("domain-c8")),
        fullFormattedMessage="Host esx01 in DC0 has entered maintenance mode")
    data = to_structured(to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID,
                                       api_version="8.0"))["data"]
    assert data["Host"] == {"Name": "esx01", "Host": {"Type": "HostSystem", "Value": "host-19"}}
    assert data["Datacenter"] == {"Name": "DC0",
                                  "Datacenter": {"Type": "Datacenter", "Value": "datacenter-2"}}
    assert data["ComputeResource"]["ComputeResource"] == {"Type": "ClusterComputeResource",
                                                          "Value": "domain-c8"}
    assert data["Vm"] is None
    assert data["ChainId"] == 4710
    assert data["UserName"] == "VSPHERE.LOCAL\\Administrator"
    assert data["FullFormattedMessage"] == "Host esx01 in DC0 has entered maintenance mode"


def test_ids_are_stable_per_vcenter_and_key() -> None:
    assert event_id(VC_UUID, 1) == event_id(VC_UUID, 1)
    assert event_id(VC_UUID, 1) != event_id(VC_UUID, 2)
    assert event_id(VC_UUID, 1) != event_id("another-vcenter", 1)


def test_vsphere_type_style() -> None:
    event = vim.event.VmPoweredOnEvent(key=1, createdTime=CREATED)
    ce = to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID, api_version="8.0",
                       type_style="vsphere")
    assert ce.get_type() == "com.vmware.vsphere.VmPoweredOnEvent.v0"
    ex = vim.event.EventEx(key=2, createdTime=CREATED,
                           eventTypeId="com.vmware.cl.CreateLibraryEvent")
    assert to_cloudevent(ex, source=SOURCE, instance_uuid=VC_UUID, api_version="8.0",
                         type_style="vsphere").get_type() == \
        "com.vmware.vsphere.com.vmware.cl.CreateLibraryEvent.v0"


def test_object_without_key_is_refused_with_a_reason() -> None:
    # pyvmomi never builds an Event without its required key, but a vCenter extension can send
    # odd objects through the event stream: they are refused by name, not half-converted.
    with pytest.raises(MalformedEvent, match="HostEventArgument has no integer key"):
        to_cloudevent(vim.event.HostEventArgument(name="esx01"), source=SOURCE,
                      instance_uuid=VC_UUID, api_version="8.0")


@pytest.mark.parametrize("payload", ["{not json", "[]", '{"id": "x"}', b"\xff\xfe", "{}"])
def test_malformed_structured_events_raise_value_error(payload: str | bytes) -> None:
    with pytest.raises(ValueError):
        from_structured(payload)


def test_a_new_key_epoch_gives_new_ids() -> None:
    assert event_id(VC_UUID, 7, key_epoch=0) == event_id(VC_UUID, 7)
    assert event_id(VC_UUID, 7, key_epoch=1) != event_id(VC_UUID, 7)


def test_the_key_epoch_is_an_extension_from_epoch_1_on() -> None:
    """Epoch 0 events are as they always were; later epochs say theirs, through the structured
    form, so that a consumer can order ``(epoch, key)``."""
    event = vim.event.ExitMaintenanceModeEvent(
        key=3, chainId=3, createdTime=CREATED,
        host=vim.event.HostEventArgument(name="esx01", host=vim.HostSystem("host-19")))
    first = to_structured(to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID,
                                        api_version="8.0"), json_data=True)
    assert KEY_EPOCH_ATTRIBUTE not in first and first["id"] == event_id(VC_UUID, 3)
    later = to_structured(to_cloudevent(event, source=SOURCE, instance_uuid=VC_UUID,
                                        api_version="8.0", key_epoch=2), json_data=True)
    assert later[KEY_EPOCH_ATTRIBUTE] == 2 and later["id"] == event_id(VC_UUID, 3, key_epoch=2)
    assert from_structured(json.dumps(later)).get_extension(KEY_EPOCH_ATTRIBUTE) == 2
    assert to_structured(from_structured(later))[KEY_EPOCH_ATTRIBUTE] == 2
