"""Simulated vCenter events as the producer archives them, for the archive and replay tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from producer.cloudevent import to_cloudevent
from producer.reader import SeenKeys
from producer.simulated import SIMULATED_URL, SIMULATED_UUID, SimulatedReader
from vebaq.core.envelope import to_structured

UUID, SOURCE = SIMULATED_UUID, SIMULATED_URL
#: When the test events start.
BASE = datetime(2025, 6, 3, 14, 0, tzinfo=UTC)
#: The archive's clock in the tests (it trims by age).
NOW = (BASE + timedelta(hours=3)).timestamp()

Archived = list[tuple[dict[str, Any], datetime]]


def events(count: int, start: datetime = BASE, step: timedelta = timedelta(seconds=1),
           first_key: int = 1, seed: int = 7) -> Archived:
    """``count`` simulated events (hosts in and out of maintenance mode, VMs powered on and off,
    logins), ``step`` apart: (structured CloudEvent, creation time) pairs."""
    reader = SimulatedReader(begin=start, seen=SeenKeys([first_key - 1] if first_key > 1 else []),
                             rate=0, backlog=count, seed=seed, page_size=count)
    pairs = []
    for i, raw in enumerate(reader.poll()):
        raw.createdTime = start + i * step
        cloudevent = to_cloudevent(raw, source=SOURCE, instance_uuid=UUID,
                                   api_version="8.0.3.0")
        pairs.append((to_structured(cloudevent), cloudevent.get_time()))
    return pairs


def ids(pairs: Archived) -> list[str]:
    return [event["id"] for event, _ in pairs]
