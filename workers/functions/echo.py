"""The ``echo`` pool: logs every event, attributes and data, like VEBA's kn-ps-echo (but with
the data actually printed)."""

from __future__ import annotations

import json
import logging

from cloudevents.core.v1.event import CloudEvent

from workers.pools import function

logger = logging.getLogger("vebaq.echo")


def render(event: CloudEvent) -> str:
    """Attributes one per line, then the data as indented JSON; headed by the subject (the
    type for an event without one, as its task is named)."""
    attributes = event.get_attributes()
    lines = [f"CloudEvent {event.get_subject() or event.get_type()}"]
    for name in sorted(attributes):
        value = attributes[name]
        lines.append(f"  {name}: {value.isoformat() if hasattr(value, 'isoformat') else value}")
    lines.append("  data:")
    data = json.dumps(event.get_data(), indent=2, sort_keys=True, default=str)
    lines.extend(f"    {line}" for line in data.splitlines())
    return "\n".join(lines)


@function(pool="echo")
def echo(event: CloudEvent) -> None:
    logger.info("%s", render(event))
