"""vCenter events the producer could not convert: dead-lettered so that a replay converts them
again.

When :func:`producer.cloudevent.to_cloudevent` fails for an event (a converter bug, a field of a
type it does not know), the producer cannot enqueue it, and must not stop or skip it silently:
it dead-letters the event (function ``producer``, no pool) and reads on. The dead letter keeps
what a later conversion needs (:func:`dead_letter_event`):

* the event itself as pyvmomi's SOAP XML (``SoapAdapter``), the form vCenter sent it in, which
  deserializes into the same ``vim.event`` object;
* where it came from: the vCenter URL, instance UUID, API version and key epoch, from which the
  CloudEvent's ``source``, ``id`` and extensions are made — so a replayed event has the id it
  would have had.

``vebaq dlq replay`` then calls :func:`replay_messages`: deserialize, convert with today's code
and ``cloudevents.type``, route with today's triggers, enqueue to each pool. If the conversion
still fails the dead letter stays (:class:`~vebaq.core.errors.NotReplayable` says why). An event
pyvmomi cannot serialize, or larger than :data:`MAX_XML`, is kept as text only, and is not
replayable; the dead letter says so.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pyVmomi import SoapAdapter, vim

from producer.cloudevent import MalformedEvent, subject_of, to_cloudevent
from vebaq.core.config import Settings
from vebaq.core.envelope import to_structured
from vebaq.core.errors import NotReplayable
from vebaq.core.messages import TaskMessage
from vebaq.core.routing import route

#: The ``function`` of the producer's dead letters (a worker's are its functions' names).
FUNCTION = "producer"
#: Longest SOAP XML kept, in characters (an event is a few KiB).
MAX_XML = 1_000_000
#: Longest text kept of an event that has no usable XML, in characters.
MAX_TEXT = 20_000


def dead_letter_event(event: vim.event.Event, *, source: str, instance_uuid: str,
                      api_version: str, key_epoch: int) -> dict[str, Any]:
    """What the dead letter of an unconvertible ``event`` keeps as its ``event``."""
    key = getattr(event, "key", None)
    kept: dict[str, Any] = {"vcenter": source, "instanceUuid": instance_uuid,
                            "apiVersion": api_version, "keyEpoch": key_epoch,
                            "key": key if isinstance(key, int) else None,
                            "subject": subject_of(event)}
    try:
        xml = SoapAdapter.SerializeToStr(event)
    except Exception as exc:  # whatever pyvmomi raises, the event is still kept as text
        return {**kept, "raw": _text(event),
                "notReplayable": f"pyvmomi cannot serialize it ({type(exc).__name__}: {exc})"}
    if len(xml) > MAX_XML:
        return {**kept, "raw": xml[:MAX_TEXT],
                "notReplayable": f"its SOAP XML is {len(xml):,} characters (more than {MAX_XML:,})"}
    return {**kept, "soap": xml}


def _text(event: vim.event.Event) -> str:
    """The event as pyvmomi prints it, or as much as can be said (printing checks the required
    fields too, and the event may lack one)."""
    try:
        return str(event)[:MAX_TEXT]
    except Exception as exc:
        fields = {name: getattr(event, name, None) for name in ("key", "createdTime", "userName",
                                                               "fullFormattedMessage")}
        return f"{type(event).__name__} (pyvmomi cannot print it: {exc}) {fields!r}"[:MAX_TEXT]


def is_producer_letter(record: dict[str, Any]) -> bool:
    return record.get("function") == FUNCTION and record.get("pool") is None


def replay_messages(record: dict[str, Any], settings: Settings) -> Sequence[TaskMessage]:
    """The task messages that replay a producer dead letter: the event converted again and
    routed with ``settings``' triggers (none: no trigger matches it today). Raises
    :class:`NotReplayable` saying why not."""
    letter = record.get("id")
    kept = record.get("event") if isinstance(record.get("event"), dict) else {}
    xml = kept.get("soap")
    if not isinstance(xml, str) or not xml:
        why = kept.get("notReplayable") or "it keeps no SOAP XML of the event (an older vebaq)"
        raise NotReplayable(f"dead letter {letter}: the producer could not keep the event for a "
                            f"replay: {why}; see `vebaq dlq show {letter}`, then purge it")
    try:
        event = SoapAdapter.Deserialize(xml)
    except Exception as exc:  # a damaged record
        event, why = None, f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    if not isinstance(event, vim.event.Event):
        raise NotReplayable(f"dead letter {letter}: its SOAP XML does not parse into an event"
                            f"{why}")
    try:
        structured = to_structured(to_cloudevent(
            event, source=str(kept.get("vcenter")), instance_uuid=str(kept.get("instanceUuid")),
            api_version=str(kept.get("apiVersion")), type_style=settings.cloudevent_type,
            key_epoch=int(kept.get("keyEpoch") or 0)))
    except (MalformedEvent, ValueError, TypeError) as exc:
        raise NotReplayable(f"dead letter {letter}: {subject_of(event)} still cannot be "
                            f"converted: {exc}") from None
    token = f"replay-{uuid.uuid4().hex[:8]}"
    return [TaskMessage(structured["subject"], structured, pool, id_suffix=token)
            for pool in route(settings.triggers, structured)]
