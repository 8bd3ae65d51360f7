"""Filters pushed down to vCenter: the collector asks only for events some trigger may match.

vCenter's ``EventFilterSpec`` can narrow a collector by event type (``eventTypeId``: class
names, and the ids of ``EventEx``/``ExtendedEvent``), by user (``userName.userList``) and by one
inventory entity with its subtree (``entity`` + ``recursion: all``), so events no trigger wants
never cross the network (Event-Driven Ansible's vCenter source does the same with options of its
own). Here the spec is *derived from the triggers*, and it is an over-approximation: every event
some trigger matches passes it, and the triggers still route every event the collector returns,
so the routed result is the same with or without it — only fewer events are read.

How a trigger is approximated (:func:`approximate`): each filter gives a :class:`Need`, what
an event must have for it to match — a set of subjects, a set of user names, one entity — or
nothing known (``None`` in a field: anything goes). ``exact`` on ``subject`` (or, with
``cloudevents.type: vsphere``, on ``type``), on ``data.UserName``, or on an entity's moref
(``data.Datacenter.Datacenter.Value``, ``data.Host.Host.Value``, ``data.Vm.Vm.Value``,
``data.Ds.Datastore.Value``) says something; ``exact`` on ``source``/``vcenteruuid`` decides
whether the trigger can match this vCenter at all; ``all`` and a trigger's filter list
intersect, ``any`` unites, ``not`` and the other dialects say nothing (sound, if not tight).
The producer's spec is the union over all triggers, field by field: one trigger that matches
every event (the default ``echo``) means no pushdown.

vCenter's side, as the pure-Python model :func:`Pushdown.admits` states it (the test peer
implements the same, and ``tests/test_pushdown.py`` checks the model against it on real
events): an event passes ``eventTypeId`` if its class name *or* its ``eventTypeId`` is listed
(so an event whose subject is listed always passes); ``userName`` if its user is listed (events
without a user are not asked for: a trigger on ``data.UserName: ""`` gives no user constraint);
``entity`` with ``recursion: all`` if the entity is one of the event's arguments or above one of
them in the inventory (the model relies only on the first).

Failure modes: an entity that no longer exists makes ``CreateCollectorForEvents`` fail
(``ManagedObjectNotFound``): the reader logs one WARNING and reads everything instead
(:mod:`producer.reader`). A pushed-down collector's newest matching event is not vCenter's
newest event: the reader's stall watchdog then reads the collector's own ``latestPage``, and
key gaps between matching events are expected, not lost (see the reader).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from vebaq.core.routing import MISSING, Filter, Trigger, parse_path

#: Data paths of an event's entity arguments → the moref type vCenter filters by.
ENTITY_PATHS: dict[str, str] = {
    "data.Datacenter.Datacenter.Value": "Datacenter",
    "data.Host.Host.Value": "HostSystem",
    "data.Vm.Vm.Value": "VirtualMachine",
    "data.Ds.Datastore.Value": "Datastore",
}

#: The data path of the event's user.
USER_PATH = "data.UserName"

#: ``cloudevents.type: vsphere`` types: ``com.vmware.vsphere.<subject>.v0``.
VSPHERE_TYPE_PREFIX, VSPHERE_TYPE_SUFFIX = "com.vmware.vsphere.", ".v0"


@dataclass(frozen=True)
class Need:
    """What an event must have to match (``None``: nothing known); :data:`NEVER` matches no
    event of this vCenter."""

    subjects: frozenset[str] | None = None
    users: frozenset[str] | None = None
    entity: tuple[str, str] | None = None  # (moref type, value)
    never: bool = False

    @property
    def anything(self) -> bool:
        return not self.never and self.subjects is None and self.users is None and \
            self.entity is None


ANYTHING = Need()
NEVER = Need(never=True)


def _meet_sets(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def meet(a: Need, b: Need) -> Need:
    """What an event matching both needs (an intersection, over-approximated)."""
    if a.never or b.never:
        return NEVER
    subjects, users = _meet_sets(a.subjects, b.subjects), _meet_sets(a.users, b.users)
    if subjects == frozenset() or users == frozenset():
        return NEVER
    # One entity per spec: an event about both is about the first, which is enough to ask for.
    return Need(subjects, users, a.entity or b.entity)


def join(a: Need, b: Need) -> Need:
    """What an event matching either needs (a union, over-approximated)."""
    if a.never:
        return b
    if b.never:
        return a
    subjects = None if a.subjects is None or b.subjects is None else a.subjects | b.subjects
    users = None if a.users is None or b.users is None else a.users | b.users
    return Need(subjects, users, a.entity if a.entity == b.entity else None)


def _exact(name: str, value: Any, known: Mapping[str, str], type_style: str) -> Need:
    if name == "subject" and isinstance(value, str):
        return Need(subjects=frozenset({value}))
    if name == "type" and type_style == "vsphere" and isinstance(value, str) and \
            value.startswith(VSPHERE_TYPE_PREFIX) and value.endswith(VSPHERE_TYPE_SUFFIX):
        subject = value[len(VSPHERE_TYPE_PREFIX):-len(VSPHERE_TYPE_SUFFIX)]
        return Need(subjects=frozenset({subject})) if subject else NEVER
    if name in known:
        return ANYTHING if value == known[name] else NEVER
    if name == USER_PATH and isinstance(value, str) and value:
        return Need(users=frozenset({value}))
    if name in ENTITY_PATHS and isinstance(value, str) and value:
        return Need(entity=(ENTITY_PATHS[name], value))
    return ANYTHING


def need_of(node: Filter, known: Mapping[str, str], type_style: str) -> Need:
    """What an event must have to match ``node`` (sound: never narrower than the filter)."""
    if node.dialect == "exact":
        need = ANYTHING
        for name, value in node.attributes:
            need = meet(need, _exact(name, value, known, type_style))
        return need
    if node.dialect == "all":
        need = ANYTHING
        for child in node.children:
            need = meet(need, need_of(child, known, type_style))
        return need
    if node.dialect == "any":
        need = NEVER
        for child in node.children:
            need = join(need, need_of(child, known, type_style))
        return need
    return ANYTHING  # not, prefix, suffix, numeric, regex, exists: nothing vCenter can ask


def approximate(trigger: Trigger, known: Mapping[str, str], type_style: str) -> Need:
    need = ANYTHING
    for node in trigger.filters:
        need = meet(need, need_of(node, known, type_style))
    return need


@dataclass(frozen=True)
class Pushdown:
    """The filter a producer asks vCenter for (each field ``None``: not narrowed)."""

    subjects: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None
    entity: tuple[str, str] | None = None

    def spec_fields(self, stub: Any) -> dict[str, Any]:
        """Keyword arguments of ``vim.event.EventFilterSpec`` (``stub``: the session's, for
        the entity's managed object reference)."""
        fields: dict[str, Any] = {}
        if self.subjects is not None:
            fields["eventTypeId"] = list(self.subjects)
        if self.users is not None:
            fields["userName"] = vim.event.EventFilterSpec.ByUsername(
                systemUser=False, userList=list(self.users))
        if self.entity is not None:
            kind, value = self.entity
            fields["entity"] = vim.event.EventFilterSpec.ByEntity(
                entity=getattr(vim, kind)(value, stub), recursion="all")
        return fields

    def admits(self, event: Mapping[str, Any]) -> bool:
        """The model of vCenter's filter on a structured CloudEvent: what it passes at least
        (see the module docstring)."""
        if self.subjects is not None and event.get("subject") not in self.subjects:
            return False
        data = event.get("data")
        data = data if isinstance(data, Mapping) else {}
        if self.users is not None and data.get("UserName") not in self.users:
            return False
        if self.entity is not None:
            kind, value = self.entity
            path = next(p for p, k in ENTITY_PATHS.items() if k == kind)
            found = parse_path(path, path).resolve(event)
            if found is MISSING or found != value:
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.subjects is not None:
            parts.append(f"eventTypeId in [{', '.join(self.subjects)}]")
        if self.users is not None:
            parts.append(f"userName in [{', '.join(self.users)}]")
        if self.entity is not None:
            parts.append(f"entity {self.entity[0]}:{self.entity[1]} (recursion all)")
        return ", ".join(parts)


def pushdown_for(triggers: Iterable[Trigger], *, source: str, instance_uuid: str,
                 type_style: str) -> tuple[Pushdown | None, str]:
    """The filter to push down for these triggers (``None``: read everything), and why, in
    words for the log line."""
    known = {"source": source, "vcenteruuid": instance_uuid}
    union = NEVER
    for trigger in triggers:
        need = approximate(trigger, known, type_style)
        if need.anything:
            return None, f"trigger {trigger.name!r} may match any event"
        union = join(union, need)
    if union.never:
        return None, "no trigger can match this vCenter's events"
    pushdown = Pushdown(
        tuple(sorted(union.subjects)) if union.subjects is not None else None,
        tuple(sorted(union.users)) if union.users is not None else None,
        union.entity)
    if pushdown.subjects is None and pushdown.users is None and pushdown.entity is None:
        return None, "the triggers share no event type, user or entity vCenter can filter by"
    return pushdown, pushdown.describe()
