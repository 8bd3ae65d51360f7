"""The unset values vebaq writes, checked against govmomi's own Go types (what VEBA's router
encoded), from Debian's govmomi source — which the test command installs for the simulator
(``scripts/`` deps); without it the test fails saying so, it is never skipped."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import VmomiSupport, vmodl

from producer.cloudevent import GO_ZERO_TIME, _fields
from vebaq.core.subjects import event_classes

GOVMOMI_TYPES = Path("/usr/share/gocode/src/github.com/vmware/govmomi/vim25/types")

#: Where govmomi versions differ from v0.30.2 (the last router's, which vebaq follows):
#: Debian's v0.24.2 still has these fault fields required (a struct, not a pointer).
OLDER_GOVMOMI = {("NoPermission", "Object"), ("NotAuthenticated", "Object")}



@pytest.fixture(scope="module", autouse=True)
def _govmomi_source() -> None:
    if not (GOVMOMI_TYPES / "types.go").exists():
        pytest.fail("govmomi's Go source is missing: apt-get install "
                    "golang-github-vmware-govmomi-dev (the README's test command does this)")


class GoTypes:
    """The structs, string types and interfaces of govmomi's vim25/types, as Go's JSON encoder
    sees them (no json tags: field names as declared, embedded structs flattened)."""

    def __init__(self, folder: Path) -> None:
        self.structs: dict[str, list[tuple[str | None, str]]] = {}
        self.named: dict[str, str] = {}
        self.interfaces = {"AnyType"}
        fields: list[tuple[str | None, str]] | None = None
        for name in ("types.go", "enum.go", "if.go"):
            for line in (folder / name).read_text().splitlines():
                if fields is not None:
                    if line == "}":
                        fields = None
                    elif match := re.match(r"^\t(\w+)\s+(\S+)\s+`", line):
                        fields.append((match[1], match[2]))
                    elif match := re.match(r"^\t(\w+)$", line):
                        fields.append((None, match[1]))  # embedded
                elif match := re.match(r"^type (\w+) struct \{", line):
                    fields = self.structs[match[1]] = []
                elif match := re.match(r"^type (\w+) interface", line):
                    self.interfaces.add(match[1])
                elif match := re.match(r"^type (\w+) (\w+)$", line):
                    self.named[match[1]] = match[2]

    def fields(self, struct: str) -> dict[str, str]:
        flat: dict[str, str] = {}
        for name, kind in self.structs[struct]:
            if name is None:
                for inner, inner_kind in self.fields(kind).items():
                    flat.setdefault(inner, inner_kind)
            else:
                flat[name] = kind  # an outer field hides an embedded one
        return flat

    def zero(self, kind: str) -> Any:
        """What ``json.Marshal`` writes for the zero value of ``kind``."""
        if kind.startswith(("*", "[]")) or kind in self.interfaces:
            return None
        kind = self.named.get(kind, kind)
        if kind == "string":
            return ""
        if kind == "bool":
            return False
        if re.fullmatch(r"u?int(8|16|32|64)?|float(32|64)|byte", kind):
            return 0
        if kind == "time.Time":
            return GO_ZERO_TIME
        return {name: self.zero(inner) for name, inner in self.fields(kind).items()}


def covers(ours: Any, go: Any) -> bool:
    """Equal, except that ours may have fields newer APIs added."""
    if isinstance(ours, dict) and isinstance(go, dict):
        return set(go) <= set(ours) and all(covers(ours[key], go[key]) for key in go)
    return type(ours) is type(go) and ours == go


def reachable() -> list[type]:
    """Every data class an event's fields can hold (types of fields, and their subtypes)."""
    found: dict[type, None] = {}

    def walk(cls: type) -> None:
        if cls in found:
            return
        found[cls] = None
        for prop in cls._GetPropertyList():
            kind = prop.type
            while issubclass(kind, VmomiSupport.Array):
                kind = kind.Item
            if (issubclass(kind, VmomiSupport.DataObject)
                    and not issubclass(kind, VmomiSupport.ManagedObject)):
                walk(kind)

    for cls in event_classes():
        walk(cls)
    every = [VmomiSupport.GetVmodlType(name) for name in VmomiSupport._dataDefMap]
    grown = True
    while grown:
        grown = False
        for cls in every:
            if cls not in found and any(base in found for base in cls.__mro__[1:]
                                        if base not in (vmodl.DynamicData,
                                                        VmomiSupport.DataObject)):
                walk(cls)
                grown = True
    return list(found)


def test_unset_values_are_govmomis_zero_values() -> None:
    go = GoTypes(GOVMOMI_TYPES)
    compared, differing, missing = 0, [], []
    for cls in reachable():
        if cls._wsdlName not in go.structs:
            continue  # a type newer than this govmomi
        go_fields = go.fields(cls._wsdlName)
        ours = {key: unset for _, key, unset, _ in _fields(cls)}
        missing += [(cls._wsdlName, name) for name in go_fields if name not in ours]
        for key, unset in ours.items():
            if key in go_fields and (cls._wsdlName, key) not in OLDER_GOVMOMI:
                compared += 1
                if not covers(unset, go.zero(go_fields[key])):
                    differing.append((cls._wsdlName, key, go_fields[key], unset))
    assert compared > 5000
    assert not missing, f"fields VEBA wrote that vebaq does not: {missing[:20]}"
    assert not differing, f"unset values that differ from Go's: {differing[:20]}"
