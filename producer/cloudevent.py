"""vCenter event (pyvmomi) → CloudEvent 1.0 (its structured form is :mod:`vebaq.core.envelope`).

The data keeps the shape VEBA's functions read: PascalCase field names, managed object
references as ``{"Type": "HostSystem", "Value": "host-19"}``, times in RFC 3339 UTC, and every
field of the event's own class.
"""

from __future__ import annotations

import base64
import functools
import uuid
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.v1.event import CloudEvent
from pyVmomi import VmomiSupport, vim, vmodl

from vebaq.core.subjects import class_subject

#: Namespace for the deterministic CloudEvent id: uuid5(NS, "<vCenter instance UUID>/<event key>").
ID_NAMESPACE = uuid.UUID("5f0c7a3e-3b7e-5d1b-9a51-7665626171ce")

#: CloudEvent ``type`` by event family, as VEBA's router emitted it (what its functions filter on).
ROUTER_TYPES = {
    "Event": "com.vmware.event.router/event",
    "EventEx": "com.vmware.event.router/eventex",
    "ExtendedEvent": "com.vmware.event.router/extendedevent",
}

#: pyvmomi bookkeeping fields that carry nothing for a function.
_SKIPPED_FIELDS = frozenset({"dynamicType", "dynamicProperty"})


class MalformedEvent(ValueError):
    """The event lacks what a CloudEvent needs (its key); the message says what."""


def class_name(event: vmodl.DynamicData) -> str:
    """``EnteredMaintenanceModeEvent`` for a ``vim.event.EnteredMaintenanceModeEvent``."""
    return class_subject(type(event))


def family(event: vmodl.DynamicData) -> str:
    """``EventEx``, ``ExtendedEvent`` or ``Event``."""
    if isinstance(event, vim.event.EventEx):
        return "EventEx"
    if isinstance(event, vim.event.ExtendedEvent):
        return "ExtendedEvent"
    return "Event"


def subject_of(event: vmodl.DynamicData) -> str:
    """The class name, or the ``eventTypeId`` for ``EventEx``/``ExtendedEvent``."""
    if family(event) != "Event" and getattr(event, "eventTypeId", None):
        return str(event.eventTypeId)
    return class_name(event)


def event_id(instance_uuid: str, key: int, key_epoch: int = 0) -> str:
    """The same vCenter event always gets the same id, however often it is read.

    :param key_epoch: bumped when a vCenter starts numbering its events anew (restored from a
        backup), so that a new event with a reused key does not pass for an old one."""
    scope = instance_uuid if not key_epoch else f"{instance_uuid}#{key_epoch}"
    return str(uuid.uuid5(ID_NAMESPACE, f"{scope}/{key}"))


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2021-05-06T16:20:05.137999Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, str], ...]:
    """``(pyvmomi name, PascalCase name)`` of a data class's fields, computed once per class."""
    return tuple((prop.name, pascal(prop.name)) for prop in cls._GetPropertyList()
                 if prop.name not in _SKIPPED_FIELDS)


#: Types that JSON takes as they are (exact types: pyvmomi's subclasses are converted below).
_PLAIN = frozenset({str, int, float, bool, type(None)})


def to_data(value: Any) -> Any:
    """Convert a pyvmomi value into JSON-ready data (see the module docstring)."""
    if type(value) in _PLAIN:  # most fields: checked first, it is the hot path
        return value
    if isinstance(value, VmomiSupport.ManagedObject):
        return {"Type": value._wsdlName, "Value": value._moId}
    if isinstance(value, VmomiSupport.DataObject):
        return {pascal_name: to_data(getattr(value, name, None))
                for name, pascal_name in _fields(type(value))}
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, bool | int | float | str):
        # pyvmomi's enums, longs and doubles are subclasses of these: strip them to the base.
        for base in (bool, int, float, str):
            if isinstance(value, base):
                return base(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, list | tuple):
        return [to_data(item) for item in value]
    if isinstance(value, type):  # vmodl.TypeName values
        return value.__name__
    return str(value)


def to_cloudevent(event: vim.event.Event, *, source: str, instance_uuid: str,
                  api_version: str, type_style: str = "router",
                  key_epoch: int = 0) -> CloudEvent:
    """Build the CloudEvent for one vCenter event.

    :param source: the vCenter SDK URL (the CloudEvent ``source``).
    :param instance_uuid: ``about.instanceUuid`` of that vCenter; scopes the event key.
    :param api_version: ``about.apiVersion``, kept as the ``vsphereapiversion`` extension.
    :param type_style: ``router`` (``com.vmware.event.router/event`` …) or ``vsphere``
        (``com.vmware.vsphere.<subject>.v0``).
    :param key_epoch: see :func:`event_id`.
    """
    key = getattr(event, "key", None)
    if not isinstance(key, int):
        raise MalformedEvent(f"{class_name(event)} has no integer key (got {key!r})")
    subject = subject_of(event)
    kind = family(event)
    attributes: dict[str, Any] = {
        "id": event_id(instance_uuid, key, key_epoch),
        "source": source,
        "type": (ROUTER_TYPES[kind] if type_style == "router"
                 else f"com.vmware.vsphere.{subject}.v0"),
        "subject": subject,
        "datacontenttype": "application/json",
        "eventclass": kind.lower(),
        "vsphereapiversion": api_version,
        # Lets a function tell apart same-named hosts of two vCenters (morefs are per vCenter).
        "vcenteruuid": instance_uuid,
    }
    created = getattr(event, "createdTime", None)
    if isinstance(created, datetime):
        attributes["time"] = created if created.tzinfo else created.replace(tzinfo=UTC)
    return CloudEvent(attributes, to_data(event))
