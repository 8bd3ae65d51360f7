"""The CloudEvent envelope every task carries: structured JSON mode, to and from.

A task's ``event`` argument is the structured form (``application/cloudevents+json``) as a
JSON object. :func:`to_structured` and :func:`from_structured` are the only conversions; the
second validates, so a forged or damaged message becomes a clear error instead of an exception
deep inside a function.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

#: What a structured event must carry; the SDK would invent a missing ``id``.
REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")

_FORMAT = JSONFormat()


def check_time(value: Any, name: str = "time") -> None:
    """Raise ``ValueError`` unless ``value`` is an RFC 3339 time (the SDK's own message for a
    bad one is about an integer)."""
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not an RFC 3339 time") from None


def to_structured(event: CloudEvent) -> dict[str, Any]:
    """The structured-mode JSON object as a dict."""
    return json.loads(_FORMAT.write(event))


def from_structured(payload: dict[str, Any] | str | bytes) -> CloudEvent:
    """Parse and validate the structured form; raises ``ValueError`` saying what is wrong."""
    try:
        parsed = json.loads(payload) if isinstance(payload, str | bytes) else payload
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object, got {type(parsed).__name__}")
    missing = [name for name in REQUIRED_ATTRIBUTES if not parsed.get(name)]
    if missing:
        raise ValueError(f"missing required attribute(s): {', '.join(missing)}")
    if "time" in parsed:
        check_time(parsed["time"])
    try:
        return _FORMAT.read(None, json.dumps(parsed))
    except BaseCloudEventException as exc:
        raise ValueError(f"invalid CloudEvent: {str(exc)[:300]}") from None
    except (TypeError, AttributeError, KeyError, OverflowError) as exc:
        raise ValueError(f"invalid CloudEvent: {exc}") from None
