"""The ``echo`` pool: logs every event, attributes and data, like VEBA's kn-ps-echo (but with
the data actually printed).

The data is printed as ``json.dumps(data, indent=2, sort_keys=True, default=str)`` would, by
:func:`pretty`: the standard library writes indented JSON in pure Python, about three times
slower, and the echo worker runs it for every event.
"""

from __future__ import annotations

import json
import logging
from json.encoder import encode_basestring_ascii
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from workers.pools import function

logger = logging.getLogger("vebaq.echo")

#: What each level of the data is indented by.
INDENT = "  "

#: Where the data starts, under ``data:``.
DATA_MARGIN = "    "


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _write(value: Any, newline: str, out: list[str]) -> None:
    """Append ``value``'s indented JSON to ``out``; ``newline`` starts each of its lines."""
    kind = type(value)
    if kind is str:
        out.append(encode_basestring_ascii(value))
    elif kind is dict and all(type(key) is str for key in value):
        if not value:
            out.append("{}")
            return
        inner = newline + INDENT
        opening = "{"
        for key in sorted(value):
            out += (opening, inner, encode_basestring_ascii(key), ": ")
            opening = ","
            _write(value[key], inner, out)
        out += (newline, "}")
    elif kind is list:
        if not value:
            out.append("[]")
            return
        inner = newline + INDENT
        opening = "["
        for item in value:
            out += (opening, inner)
            opening = ","
            _write(item, inner, out)
        out += (newline, "]")
    elif value is None:
        out.append("null")
    elif value is True or value is False:
        out.append("true" if value else "false")
    elif kind is int:
        out.append(int.__repr__(value))
    elif kind is float:
        out.append(_float(value))
    else:  # anything else (subclasses, tuples, other keys, objects): the standard library
        text = json.dumps(value, indent=len(INDENT), sort_keys=True, default=str)
        out.append(text.replace("\n", newline))


def pretty(value: Any, margin: str = "") -> str:
    """``json.dumps(value, indent=2, sort_keys=True, default=str)``, each line after the first
    preceded by ``margin``."""
    out: list[str] = []
    _write(value, "\n" + margin, out)
    return "".join(out)


def render(event: CloudEvent) -> str:
    """Attributes one per line, then the data as indented JSON; headed by the subject (the
    type for an event without one, as its task is named)."""
    attributes = event.get_attributes()
    lines = [f"CloudEvent {event.get_subject() or event.get_type()}"]
    for name in sorted(attributes):
        value = attributes[name]
        lines.append(f"  {name}: {value.isoformat() if hasattr(value, 'isoformat') else value}")
    lines.append(f"  data:\n{DATA_MARGIN}{pretty(event.get_data(), DATA_MARGIN)}")
    return "\n".join(lines)


@function(pool="echo")
def echo(event: CloudEvent) -> None:
    logger.info("%s", render(event))
