"""Triggers: which worker pools receive which CloudEvents.

A trigger names a pool and a list of filters, with the semantics of Knative's ``filters`` field:
every filter in the list must match; an empty list matches every event. A filter names
CloudEvent *attributes* (``subject``, ``type``, ``source``…) as Knative does, or fields *inside
the event's data* by path: ``data.Host.Name``, ``data.Datacenter.Datacenter.Value``,
``data.Arguments.0.Key`` (a number indexes a list). Knative cannot filter on data; EventBridge
can, and the dialects past Knative's borrow its ideas. Dialects:

``exact`` / ``prefix`` / ``suffix``
    a mapping of attribute or path → string; each must equal / start with / end with it.
    ``exact`` on a data path also takes a number or a boolean (``exact: {data.Key: 42}``); types
    are never coerced (``"42"`` is not ``42``, ``true`` is not ``1``).
``numeric``
    path → mapping of comparisons, all of which must hold: ``numeric: {data.Key: {">": 100,
    "<=": 200}}`` (operators ``<``, ``<=``, ``>``, ``>=``, ``=``, ``!=``); the value must be a
    number (a boolean or a string is not).
``regex``
    path → a regular expression that must match somewhere in the (string) value; anchor it with
    ``^…$`` for a whole match. RE2 syntax, run by RE2 (``google-re2``): matching takes time
    linear in the input, whatever the pattern, so no event can stall routing (Python's ``re``
    backtracks exponentially on patterns such as ``(a+)+$``). RE2 has no backreferences or
    look-arounds; such a pattern is refused when the configuration loads.
``exists``
    path → ``true`` (present and not null) or ``false`` (absent or null; VEBA's data has
    ``"Vm": null`` for events about no VM).
``any`` / ``all``
    a list of filters, one / every one of which must match.
``not``
    one filter, which must not match.

A path that names nothing in an event (a missing field, a list index past the end, a field of
a string) makes every dialect but ``exists: false`` not match. Paths and patterns are checked
and compiled when the configuration loads: a bad one is one :class:`ConfigError` naming the
trigger, the filter and the path, e.g. ``triggers[2].filters[0].exact.data.Vm..Name: bad path
(an empty field name)``. Each filter is compiled to one closure, so matching an event is a few
dictionary look-ups per filter (``python -m bench routing``).

A trigger may also *throttle* what it sends per key (:class:`Throttle`, carried out by the
producer with :mod:`vebaq.core.throttle`).

Example (the default ``vrops`` trigger, and one on data)::

    - name: vrops-maintenance
      pool: vrops
      filters:
        - any:
            - exact: {subject: EnteredMaintenanceModeEvent}
            - exact: {subject: ExitMaintenanceModeEvent}
    - name: prod-vms-powered-off
      pool: tickets
      filters:
        - exact: {subject: VmPoweredOffEvent, data.Datacenter.Name: dc-east}
        - regex: {data.Vm.Name: "^prod-[0-9]+$"}
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

from vebaq.core.errors import ConfigError

#: The event, in its structured form (attributes at the top, the data under ``data``).
Attributes = Mapping[str, Any]

#: A compiled test of one event.
Matcher = Callable[[Attributes], bool]

#: Dialects naming attributes or paths, and those combining filters.
FIELD_DIALECTS = ("exact", "prefix", "suffix", "numeric", "regex", "exists")
COMBINING_DIALECTS = ("any", "all", "not")
DIALECTS = FIELD_DIALECTS + COMBINING_DIALECTS

#: CloudEvents attribute names: lowercase ASCII letters and digits (CloudEvents 1.0, "Naming").
_ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]+$")

#: One field name of a data path: no dot, no white space, no brackets.
_SEGMENT = re.compile(r"^[^.\s\[\]]+$")

#: Comparisons of the ``numeric`` dialect.
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "=": operator.eq, "!=": operator.ne,
}

#: Longest regular expression accepted, in characters (RE2 is linear in the input; this only
#: bounds the compiled program's memory, together with :data:`REGEX_MAX_MEMORY`).
REGEX_MAX_LENGTH = 1000
#: Bytes RE2 may use for one compiled expression (its default is 8 MiB).
REGEX_MAX_MEMORY = 1 << 20

#: What :func:`resolve` returns for a path that names nothing (``None`` is JSON's null).
MISSING = object()


# --- paths

@dataclass(frozen=True)
class Path:
    """An attribute name (``subject``) or a path into the data (``data.Host.Name``).

    :param text: as written in the configuration.
    :param segments: the field names after ``data`` (empty for an attribute); a segment of
        digits also indexes a list.
    """

    text: str
    segments: tuple[str | int, ...] = ()

    @property
    def is_data(self) -> bool:
        return bool(self.segments)

    def resolve(self, event: Attributes) -> Any:
        """The value the path names in ``event``, or :data:`MISSING`."""
        if not self.segments:
            return event.get(self.text, MISSING)
        value: Any = event.get("data", MISSING)
        for segment in self.segments:
            if isinstance(value, Mapping):
                value = value.get(segment if isinstance(segment, str) else str(segment), MISSING)
            elif isinstance(value, list) and isinstance(segment, int) and segment < len(value):
                value = value[segment]
            else:
                return MISSING
        return value


def parse_path(raw: Any, where: str) -> Path:
    """Check an attribute name or data path; ``where`` names it in the error (and is the path
    itself, appended to the filter's location)."""
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected an attribute name or a data path, got {raw!r}")
    if raw == "data":
        raise ConfigError(f"{where}: name a field inside the data (e.g. data.Host.Name)")
    if raw.startswith("data."):
        parts = raw.split(".")[1:]
        for part in parts:
            if not part:
                raise ConfigError(f"{where}: bad path (an empty field name)")
            if not _SEGMENT.match(part):
                raise ConfigError(f"{where}: bad path (field {part!r}: no white space or "
                                  f"brackets; index a list with .0)")
        return Path(raw, tuple(int(p) if p.isdigit() else p for p in parts))
    if not _ATTRIBUTE_NAME.match(raw):
        raise ConfigError(f"{where}: not a CloudEvent attribute (lowercase letters and digits) "
                          f"nor a data path (data.Field.Field…)")
    return Path(raw)


# --- compiled tests of one value

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equals(expected: Any) -> Callable[[Any], bool]:
    if isinstance(expected, bool):
        return lambda value: value is expected
    if _is_number(expected):
        return lambda value: _is_number(value) and value == expected
    return lambda value: value == expected and isinstance(value, str)


def _value_test(dialect: str, operand: Any) -> Callable[[Any], bool]:
    """The test one value must pass (:data:`MISSING` for a path that names nothing)."""
    if dialect == "exact":
        return _equals(operand)
    if dialect == "prefix":
        return lambda value: isinstance(value, str) and value.startswith(operand)
    if dialect == "suffix":
        return lambda value: isinstance(value, str) and value.endswith(operand)
    if dialect == "regex":
        search = operand.search
        return lambda value: isinstance(value, str) and search(value) is not None
    if dialect == "exists":
        if operand:
            return lambda value: value is not MISSING and value is not None
        return lambda value: value is MISSING or value is None
    comparisons = tuple((_COMPARISONS[op], bound) for op, bound in operand)  # numeric
    return lambda value: _is_number(value) and all(test(value, bound)
                                                   for test, bound in comparisons)


def _field_matcher(path: Path, test: Callable[[Any], bool]) -> Matcher:
    if not path.is_data:
        name = path.text
        return lambda event: test(event.get(name, MISSING))
    if len(path.segments) == 2 and all(isinstance(s, str) for s in path.segments):
        # The common shape (data.Host.Name): two look-ups, no loop.
        first, second = path.segments

        def two(event: Attributes) -> bool:
            data = event.get("data")
            inner = data.get(first) if isinstance(data, dict) else None
            return test(inner.get(second, MISSING) if isinstance(inner, dict) else
                        path.resolve(event))
        return two
    resolve = path.resolve
    return lambda event: test(resolve(event))


# --- filters

@dataclass(frozen=True)
class Filter:
    """One node of a filter expression (see the module docstring for the dialects).

    :param attributes: for the field dialects, (attribute or path, operand) pairs: a string for
        exact/prefix/suffix (exact: also a number or a boolean), a pattern string for regex, a
        boolean for exists, ((operator, number), …) for numeric.
    """

    dialect: str
    attributes: tuple[tuple[str, Any], ...] = ()
    children: tuple[Filter, ...] = ()
    _match: Matcher = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self._match is None:
            object.__setattr__(self, "_match", self._compile())

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(parse_path(name, name) for name, _ in self.attributes)

    def _compile(self) -> Matcher:
        if self.dialect in FIELD_DIALECTS:
            tests = []
            for name, operand in self.attributes:
                if self.dialect == "regex" and isinstance(operand, str):
                    operand = compile_regex(operand, name)
                tests.append(_field_matcher(parse_path(name, name),
                                            _value_test(self.dialect, operand)))
            if len(tests) == 1:
                return tests[0]
            tests_tuple = tuple(tests)
            return lambda event: all(test(event) for test in tests_tuple)
        children = tuple(child._match for child in self.children)
        if self.dialect == "any":
            return lambda event: any(child(event) for child in children)
        if self.dialect == "all":
            return lambda event: all(child(event) for child in children)
        if self.dialect == "not":
            only = children[0]
            return lambda event: not only(event)
        raise ValueError(f"unknown filter dialect {self.dialect!r}")

    def matches(self, event: Attributes) -> bool:
        return self._match(event)


def compile_regex(pattern: str, where: str) -> Any:
    """An RE2 program for ``pattern``; a :class:`ConfigError` naming ``where`` if RE2 refuses it
    (bad syntax, or a Perl feature RE2 lacks: backreferences, look-arounds)."""
    if len(pattern) > REGEX_MAX_LENGTH:
        raise ConfigError(f"{where}: regular expression longer than {REGEX_MAX_LENGTH} "
                          f"characters")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = REGEX_MAX_MEMORY
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ConfigError(f"{where}: bad regular expression {pattern!r} ({reason}; RE2 syntax: "
                          f"no backreferences or look-arounds)") from None


# --- throttling (carried out by the producer: vebaq.core.throttle)

#: Throttle modes: see :class:`Throttle`.
THROTTLE_MODES = ("once_within", "once_after", "batch")


@dataclass(frozen=True)
class Throttle:
    """At most so many tasks per key, in the spirit of Event-Driven Ansible's throttle.

    :param mode: ``once_within``: the first event per key, then none until ``window`` seconds
        (event time) after it; ``once_after``: an event only if its key was quiet (no event at
        all) for ``window`` seconds before it; ``batch``: ``size`` events per key become one
        task carrying them all, or fewer when ``window`` seconds passed since the first.
    :param keys: paths whose values together are the key (``data.Host.Host.Value``).
    """

    mode: str
    keys: tuple[Path, ...]
    window: float
    size: int = 0

    def key_of(self, event: Attributes) -> str:
        """The key's text: the values, JSON-like, ``|``-separated (missing → ``-``)."""
        parts = []
        for path in self.keys:
            value = path.resolve(event)
            parts.append("-" if value is MISSING or value is None else str(value))
        return "|".join(parts)

    def describe(self) -> str:
        keys = ", ".join(p.text for p in self.keys)
        if self.mode == "batch":
            return f"batch of {self.size} per {keys} (or after {self.window:g}s)"
        return f"{self.mode} {self.window:g}s per {keys}"


# --- triggers

@dataclass(frozen=True)
class Trigger:
    """Routes matching events to ``pool``; ``name`` appears in logs, errors and metrics."""

    name: str
    pool: str
    filters: tuple[Filter, ...] = field(default=())
    throttle: Throttle | None = None
    _match: Matcher = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self._match is None:
            tests = tuple(f._match for f in self.filters)
            if not tests:
                match: Matcher = lambda event: True  # noqa: E731
            elif len(tests) == 1:
                match = tests[0]
            else:
                match = lambda event: all(test(event) for test in tests)  # noqa: E731
            object.__setattr__(self, "_match", match)

    def matches(self, event: Attributes) -> bool:
        return self._match(event)


def matching(triggers: Iterable[Trigger], event: Attributes) -> list[Trigger]:
    """Every trigger matching ``event``, in order."""
    return [trigger for trigger in triggers if trigger._match(event)]


def route(triggers: Iterable[Trigger], event: Attributes) -> list[str]:
    """The pools (each once, in trigger order) whose trigger matches ``event`` (throttles are
    the producer's business: :mod:`vebaq.core.throttle`)."""
    pools: list[str] = []
    for trigger in triggers:
        if trigger.pool not in pools and trigger._match(event):
            pools.append(trigger.pool)
    return pools


# --- the configuration's form

def _field_operand(dialect: str, name: str, value: Any, path: Path, where: str) -> Any:
    """Check one operand; returns it as :class:`Filter` keeps it."""
    if dialect in ("prefix", "suffix", "regex") or (dialect == "exact" and not path.is_data):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        if dialect == "regex":
            compile_regex(value, where)
        return value
    if dialect == "exact":
        if not isinstance(value, str | int | float) or value is None:
            raise ConfigError(f"{where}: expected a string, a number or true/false, got "
                              f"{type(value).__name__}")
        return value
    if dialect == "exists":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    # numeric
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: expected a mapping of comparisons, e.g. {{'>': 100}}")
    comparisons = []
    for op, bound in value.items():
        if op not in _COMPARISONS:
            raise ConfigError(f"{where}: unknown comparison {op!r} (expected one of "
                              f"{', '.join(_COMPARISONS)})")
        if not _is_number(bound):
            raise ConfigError(f"{where}.{op}: expected a number, got {bound!r}")
        comparisons.append((op, bound))
    return tuple(comparisons)


def parse_filter(raw: Any, path: str) -> Filter:
    """Build a :class:`Filter` from its YAML form; ``path`` names it in errors."""
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ConfigError(f"{path}: a filter is a mapping with exactly one of "
                          f"{', '.join(DIALECTS)}")
    ((dialect, body),) = raw.items()
    where = f"{path}.{dialect}"
    if dialect in FIELD_DIALECTS:
        if not isinstance(body, Mapping) or not body:
            raise ConfigError(f"{where}: expected a mapping of CloudEvent attribute or data path "
                              f"to {'comparisons' if dialect == 'numeric' else 'value'}")
        attributes = []
        for name, value in body.items():
            spot = f"{where}.{name}"
            parsed = parse_path(name, spot)
            attributes.append((parsed.text, _field_operand(dialect, name, value, parsed, spot)))
        return Filter(dialect, attributes=tuple(attributes))
    if dialect in ("any", "all"):
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: expected a non-empty list of filters")
        return Filter(dialect, children=tuple(
            parse_filter(child, f"{where}[{i}]") for i, child in enumerate(body)))
    if dialect == "not":
        return Filter(dialect, children=(parse_filter(body, where),))
    raise ConfigError(f"{path}: unknown filter dialect {dialect!r} "
                      f"(expected {', '.join(DIALECTS[:-1])} or {DIALECTS[-1]})")


def parse_throttle(raw: Any, path: str, duration: Callable[[Any, str], float]) -> Throttle:
    """``throttle: {key: data.Host.Host.Value, once_within: 5m}`` (or ``once_after: 5m``, or
    ``batch: 10`` with an optional ``within: 10m``); ``duration`` parses ``5m``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping with key and one of "
                          f"{', '.join(THROTTLE_MODES)}")
    unknown = set(raw) - {"key", "within", *THROTTLE_MODES}
    if unknown:
        raise ConfigError(f"{path}.{sorted(unknown)[0]}: unknown key (expected key, "
                          f"{', '.join(THROTTLE_MODES)}, within)")
    modes = [m for m in THROTTLE_MODES if m in raw]
    if len(modes) != 1:
        raise ConfigError(f"{path}: expected exactly one of {', '.join(THROTTLE_MODES)}")
    mode = modes[0]
    if "key" not in raw:
        raise ConfigError(f"{path}.key: missing (the path, or list of paths, that tells events "
                          f"apart, e.g. data.Host.Host.Value)")
    names: Sequence[Any] = raw["key"] if isinstance(raw["key"], list) else [raw["key"]]
    if not names:
        raise ConfigError(f"{path}.key: expected a path or a non-empty list of paths")
    keys = tuple(parse_path(name, f"{path}.key") for name in names)
    if mode == "batch":
        size = raw["batch"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise ConfigError(f"{path}.batch: expected a whole number of events ≥ 2, "
                              f"got {size!r}")
        window = duration(raw.get("within", "1h"), f"{path}.within")
        if window <= 0:
            raise ConfigError(f"{path}.within: must be > 0")
        return Throttle(mode, keys, window, size)
    if "within" in raw:
        raise ConfigError(f"{path}.within: only for batch (the window is {mode}'s value)")
    window = duration(raw[mode], f"{path}.{mode}")
    if window <= 0:
        raise ConfigError(f"{path}.{mode}: must be > 0")
    return Throttle(mode, keys, window)


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
