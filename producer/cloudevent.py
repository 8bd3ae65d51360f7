"""vCenter event (pyvmomi) → CloudEvent 1.0 (its structured form is :mod:`vebaq.core.envelope`).

The data keeps the shape VEBA's functions read: PascalCase field names, managed object
references as ``{"Type": "HostSystem", "Value": "host-19"}``, times in RFC 3339 UTC, and every
field of the event's own class.

A vCenter that numbers its events anew (restored from a backup, reinstalled) gets a new *key
epoch* from the producer (:mod:`producer.checkpoint`); its events carry it in the
``vcenterkeyepoch`` extension (:data:`vebaq.core.envelope.KEY_EPOCH_ATTRIBUTE`), so that a
consumer ordering events by key (the vrops pool) orders them by ``(key epoch, key)``. Epoch 0
(every vCenter never renumbered) leaves the attribute out, so those events are exactly as
before, ids included; a consumer reads a missing attribute as epoch 0.
"""

from __future__ import annotations

import base64
import copy
import functools
import uuid
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.v1.event import CloudEvent
from pyVmomi import VmomiSupport, vim, vmodl

from vebaq.core.envelope import KEY_EPOCH_ATTRIBUTE
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


def pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


#: Go's zero ``time.Time``: what VEBA's router wrote for an unset required time.
GO_ZERO_TIME = "0001-01-01T00:00:00Z"

#: A managed object reference that is required but unset (govmomi: a struct, not a pointer).
_ZERO_MOREF: dict[str, str] = {"Type": "", "Value": ""}

#: Fields govmomi declares as pointers where the rule of :func:`_unset_value` would give a plain
#: value: the only optional numbers it declares ``*int32``/``*int64``, and two booleans that
#: pyvmomi has as required. Unset, VEBA wrote null for these. ``(WSDL type, field)``, as govmomi
#: v0.30.2 (the last router's) declares them.
_POINTER_FIELDS = frozenset({
    ("ClusterDasAdmissionControlPolicy", "resourceReductionToToleratePercent"),
    ("CpuIncompatible1ECX", "aes"),
    ("CpuIncompatible1ECX", "pclmulqdq"),
    ("DVSMacLearningPolicy", "limit"),
    ("DVSNetworkResourcePoolAllocationInfo", "limit"),
    ("DvsHostInfrastructureTrafficResourceAllocation", "limit"),
    ("DvsHostInfrastructureTrafficResourceAllocation", "reservation"),
    ("DvsVnicAllocatedResource", "reservation"),
    ("GuestPosixFileAttributes", "groupId"),
    ("GuestPosixFileAttributes", "ownerId"),
    ("HostLowLevelProvisioningManagerDiskLayoutSpec", "unitNumber"),
    ("HostPlacedVirtualNicIdentifier", "reservation"),
    ("LimitExceeded", "limit"),
    ("NamespaceLimitReached", "limit"),
    ("NetworkSummary", "ipPoolId"),
    ("ResourceAllocationInfo", "limit"),
    ("ResourceAllocationInfo", "overheadLimit"),
    ("ResourceAllocationInfo", "reservation"),
    ("StorageIOAllocationInfo", "limit"),
    ("StorageIOAllocationInfo", "reservation"),
    ("VirtualDevice", "unitNumber"),
    ("VirtualEthernetCardResourceAllocation", "limit"),
    ("VirtualEthernetCardResourceAllocation", "reservation"),
})

#: Data types that newer APIs gave subtypes but govmomi v0.30.2 still declares as plain structs
#: (not interfaces), so that a required field of one is a zero object when unset, not null.
_GOVMOMI_STRUCTS = frozenset({
    "FaultDomainId", "HostIpConfig", "OvfCreateImportSpecParams", "SDDCBase", "SSLVerifyFault",
    "VsanClusterConfigInfo", "VsanHostConfigInfo", "VsanHostConfigInfoNetworkInfoPortConfig",
    "VsanHostDiskResult", "VsanHostIpConfig", "VsanUpgradeSystemPreflightCheckResult",
    "VsanUpgradeSystemUpgradeStatus",
})

#: Types that JSON takes as they are (exact types: pyvmomi's subclasses are converted below).
_PLAIN = frozenset({str, int, float, bool, type(None)})

#: pyvmomi's own stand-in for the wire's wrapper (see :func:`_localized_fault`).
_LOCALIZED_FAULT = VmomiSupport.GetVmodlType("vmodl.LocalizedMethodFault")

#: One field of a data class: pyvmomi name, PascalCase name, the JSON value when it is unset
#: (``None`` in pyvmomi), and the converter of a set value (``None``: the generic one).
_Field = tuple[str, str, Any, Any]


@functools.cache
def _polymorphic() -> frozenset[str]:
    """vmodl names of the data types that have subtypes. govmomi declares a field of such a
    type as an interface (``BaseMethodFault``), which is null when unset even if required."""
    definitions = VmomiSupport._dataDefMap
    return frozenset(parent for parent in {definition[2] for definition in definitions.values()}
                     if parent in definitions and definitions[parent][1] not in _GOVMOMI_STRUCTS)


def _declared(cls: type, prop: Any, table: frozenset[tuple[str, str]]) -> bool:
    """Whether ``table`` names this field of ``cls`` or of the base class declaring it."""
    return any((getattr(base, "_wsdlName", None), prop.name) in table for base in cls.__mro__)


def _unset_value(cls: type, prop: Any, building: frozenset[type]) -> Any:
    """What Go's encoder wrote for this field of govmomi's struct when vCenter left it out.

    govmomi types a required field as a plain value (``string``, ``int32``, ``bool``,
    ``time.Time``, a struct) and an optional one the same way, except optional booleans, times,
    data objects and references (pointers); arrays, ``[]byte``, ``anyType`` and polymorphic
    types (interfaces) are nil whenever unset; :data:`_POINTER_FIELDS` and
    :data:`_GOVMOMI_STRUCTS` are the exceptions."""
    kind = prop.type
    optional = bool(prop.flags & VmomiSupport.F_OPTIONAL)
    if issubclass(kind, VmomiSupport.Array | bytes) or _declared(cls, prop, _POINTER_FIELDS):
        return None
    if issubclass(kind, VmomiSupport.ManagedObject):
        return None if optional else _ZERO_MOREF
    if issubclass(kind, vmodl.MethodFault) and cls is not _LOCALIZED_FAULT:  # see _localized_fault
        return None if optional else {"Fault": None, "LocalizedMessage": ""}
    if issubclass(kind, VmomiSupport.DataObject):
        if optional or kind.__name__ in _polymorphic() or kind in building:
            return None
        return _zero_object(kind, building)
    if kind is bool:
        return None if optional else False
    if issubclass(kind, datetime):
        return None if optional else GO_ZERO_TIME
    if issubclass(kind, int | float):
        return 0
    if issubclass(kind, str) or kind is type or kind is VmomiSupport.ManagedMethod:
        return ""  # strings, enums, links, property paths, type and method names
    return None  # anyType


def _zero_object(cls: type, building: frozenset[type] = frozenset()) -> dict[str, Any]:
    """A required, unset data object: govmomi's zero struct, each field at its unset value."""
    building = building | {cls}
    return {key: _unset_value(cls, prop, building) for prop, key in _properties(cls)}


def _properties(cls: type) -> list[tuple[Any, str]]:
    # A fault's ``msg`` is the ``LocalizedMessage`` of the LocalizedMethodFault around it.
    skipped = _SKIPPED_FIELDS | {"msg"} if issubclass(cls, vmodl.MethodFault) else _SKIPPED_FIELDS
    return [(prop, pascal(prop.name)) for prop in cls._GetPropertyList()
            if prop.name not in skipped]


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    """The fields of a data class (see :data:`_Field`), computed once per class."""
    fields = []
    for prop, key in _properties(cls):
        kind = prop.type
        convert = None
        if issubclass(kind, VmomiSupport.Array):
            item = kind.Item
            convert = (_bytes_array if item is VmomiSupport.byte
                       else _any_array if item is object
                       else _fault_array if issubclass(item, vmodl.MethodFault) else _array)
        elif kind is object:
            convert = _any
        elif issubclass(kind, vmodl.MethodFault) and cls is not _LOCALIZED_FAULT:
            convert = _localized_fault
        fields.append((prop.name, key, _unset_value(cls, prop, frozenset()), convert))
    return tuple(fields)


def _object(value: VmomiSupport.DataObject) -> dict[str, Any]:
    data = {}
    for name, key, unset, convert in _fields(type(value)):
        item = getattr(value, name, None)
        if item is None:
            data[key] = unset if type(unset) is not dict else copy.deepcopy(unset)
        elif convert is None:
            data[key] = item if type(item) in _PLAIN else to_data(item)
        else:
            data[key] = convert(item)
    return data


def _array(value: list[Any]) -> list[Any] | None:
    """Go writes a nil slice (how govmomi leaves an absent array) as null."""
    return [item if type(item) in _PLAIN else to_data(item) for item in value] or None


def _localized_fault(value: vmodl.MethodFault) -> dict[str, Any]:
    """pyvmomi unwraps vCenter's ``LocalizedMethodFault`` into the fault (its message in
    ``msg``); govmomi keeps the wrapper: ``{"Fault": {...}, "LocalizedMessage": "..."}``."""
    return {"Fault": to_data(value), "LocalizedMessage": value.msg or ""}


def _fault_array(value: list[vmodl.MethodFault]) -> list[dict[str, Any]] | None:
    return [_localized_fault(item) for item in value] or None


def _any_array(value: list[Any]) -> list[Any] | None:
    return [_any(item) for item in value] or None


def _bytes_array(value: list[int]) -> str | None:
    """``xsd:byte[]`` is a Go ``[]byte``: base64 text."""
    return base64.b64encode(bytes(b & 0xFF for b in value)).decode("ascii") if value else None


def _any(value: Any) -> Any:
    """An ``anyType`` value (``KeyAnyValue.Value`` in EventEx ``Arguments``): as govmomi decodes
    it, a scalar stays a scalar and an array is its ``ArrayOfX`` struct, ``{"X": [...]}``."""
    if isinstance(value, VmomiSupport.Array):
        item = value.Item
        name = ("ManagedObjectReference" if issubclass(item, VmomiSupport.ManagedObject)
                else VmomiSupport.GetWsdlName(type(value)).removeprefix("ArrayOf"))
        return {pascal(name): (_bytes_array(value) if item is VmomiSupport.byte
                               else _any_array(value))}
    return to_data(value)


def go_time(value: datetime) -> str:
    """A time as Go's encoder writes ``time.Time`` (RFC 3339, trailing zeros of the fraction
    dropped): ``2022-04-20T15:47:32.365Z``; UTC, as vCenter sends it."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    text = value.isoformat()
    if value.microsecond:
        text = text.rstrip("0")
    return text + "Z"


def to_data(value: Any) -> Any:
    """Convert a pyvmomi value into JSON-ready data, exactly as VEBA's router wrote it (Go's
    ``encoding/json`` over govmomi's structs): see :func:`_unset_value` for unset fields."""
    if type(value) in _PLAIN:  # most fields: checked first, it is the hot path
        return value
    if isinstance(value, VmomiSupport.ManagedObject):
        return {"Type": value._wsdlName, "Value": value._moId}
    if isinstance(value, VmomiSupport.DataObject):
        return _object(value)
    if isinstance(value, datetime):
        return go_time(value)
    if isinstance(value, bool | int | float | str):
        # pyvmomi's enums, longs and doubles are subclasses of these: strip them to the base.
        for base in (bool, int, float, str):
            if isinstance(value, base):
                return base(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, list | tuple):
        return [to_data(item) for item in value]
    if isinstance(value, type):  # vmodl.TypeName values: the WSDL name, as vCenter sent it
        return getattr(value, "_wsdlName", None) or value.__name__
    if isinstance(value, VmomiSupport.ManagedMethod):  # vmodl.MethodName: likewise
        return value.info.wsdlName
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
    :param key_epoch: see :func:`event_id`; above 0 it is also the ``vcenterkeyepoch``
        extension (:data:`vebaq.core.envelope.KEY_EPOCH_ATTRIBUTE`).
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
    if key_epoch:
        # Keys restart at a new epoch: consumers order by (epoch, key), see the module doc.
        attributes[KEY_EPOCH_ATTRIBUTE] = key_epoch
    created = getattr(event, "createdTime", None)
    if isinstance(created, datetime):
        attributes["time"] = created if created.tzinfo else created.replace(tzinfo=UTC)
    return CloudEvent(attributes, to_data(event))
