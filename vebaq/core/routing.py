"""Triggers: which worker pools receive which CloudEvents.

A trigger names a pool and a list of filters over CloudEvent attributes, with the semantics of
Knative's ``filters`` field: every filter in the list must match; an empty list matches every
event. Filter dialects:

``exact`` / ``prefix`` / ``suffix``
    a mapping of attribute → string; every attribute must equal / start with / end with it.
``any`` / ``all``
    a list of filters, one / every one of which must match.
``not``
    one filter, which must not match.

Example (the default ``vrops`` trigger)::

    - name: vrops-maintenance
      pool: vrops
      filters:
        - any:
            - exact: {subject: EnteredMaintenanceModeEvent}
            - exact: {subject: ExitMaintenanceModeEvent}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vebaq.core.errors import ConfigError

#: Attributes mapped to the string they are compared with by ``exact``/``prefix``/``suffix``.
Attributes = Mapping[str, Any]

_STRING_TESTS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda value, expected: value == expected,
    "prefix": str.startswith,
    "suffix": str.endswith,
}


@dataclass(frozen=True)
class Filter:
    """One node of a filter expression (see the module docstring for the dialects)."""

    dialect: str
    attributes: tuple[tuple[str, str], ...] = ()
    children: tuple[Filter, ...] = ()

    def matches(self, event: Attributes) -> bool:
        if self.dialect in _STRING_TESTS:
            test = _STRING_TESTS[self.dialect]
            return all(
                isinstance(event.get(name), str) and test(event[name], expected)
                for name, expected in self.attributes
            )
        if self.dialect == "any":
            return any(child.matches(event) for child in self.children)
        if self.dialect == "all":
            return all(child.matches(event) for child in self.children)
        return not self.children[0].matches(event)  # "not"


@dataclass(frozen=True)
class Trigger:
    """Routes matching events to ``pool``; ``name`` only appears in logs and errors."""

    name: str
    pool: str
    filters: tuple[Filter, ...] = field(default=())

    def matches(self, event: Attributes) -> bool:
        return all(f.matches(event) for f in self.filters)


def route(triggers: Iterable[Trigger], event: Attributes) -> list[str]:
    """The pools (each once, in trigger order) whose trigger matches ``event``'s attributes."""
    pools: list[str] = []
    for trigger in triggers:
        if trigger.pool not in pools and trigger.matches(event):
            pools.append(trigger.pool)
    return pools


def parse_filter(raw: Any, path: str) -> Filter:
    """Build a :class:`Filter` from its YAML form; ``path`` names it in errors."""
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ConfigError(f"{path}: a filter is a mapping with exactly one of "
                          f"exact, prefix, suffix, any, all, not")
    ((dialect, body),) = raw.items()
    where = f"{path}.{dialect}"
    if dialect in _STRING_TESTS:
        if not isinstance(body, Mapping) or not body:
            raise ConfigError(f"{where}: expected a mapping of CloudEvent attribute to string")
        for name, value in body.items():
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{name}: expected a string, got {type(value).__name__}")
        return Filter(dialect, attributes=tuple((str(k), v) for k, v in body.items()))
    if dialect in ("any", "all"):
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: expected a non-empty list of filters")
        return Filter(dialect, children=tuple(
            parse_filter(child, f"{where}[{i}]") for i, child in enumerate(body)))
    if dialect == "not":
        return Filter(dialect, children=(parse_filter(body, where),))
    raise ConfigError(f"{path}: unknown filter dialect {dialect!r} "
                      f"(expected exact, prefix, suffix, any, all or not)")


def subjects(*names: str) -> Filter:
    """A filter matching any of the given CloudEvent subjects."""
    return Filter("any", children=tuple(Filter("exact", (("subject", n),)) for n in names))


#: What runs when the configuration names no triggers: echo sees every event, vrops sees
#: maintenance-mode changes.
DEFAULT_TRIGGERS: tuple[Trigger, ...] = (
    Trigger("echo", "echo"),
    Trigger("vrops-maintenance", "vrops",
            (subjects("EnteredMaintenanceModeEvent", "ExitMaintenanceModeEvent"),)),
)
