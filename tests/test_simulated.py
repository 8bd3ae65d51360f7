"""The built-in simulated event source (`vebaq dev`, `vebaq producer --simulate`, bench)."""

from __future__ import annotations

from datetime import UTC, datetime

from producer.cloudevent import to_cloudevent
from producer.reader import SeenKeys
from producer.simulated import SIMULATED_URL, SIMULATED_UUID, SimulatedReader
from vebaq.core.envelope import to_structured


def test_a_backlog_comes_in_pages_of_real_events_with_increasing_keys() -> None:
    reader = SimulatedReader(begin=datetime.now(UTC), seen=SeenKeys(), rate=0, backlog=2500,
                             seed=1)
    pages, waiting = [], []
    while page := reader.poll():
        pages.append(page)
        waiting.append(reader.more_waiting)
    assert [len(p) for p in pages] == [1000, 1000, 500] and waiting == [True, True, False]
    keys = [e.key for page in pages for e in page]
    assert keys == list(range(1, 2501))
    subjects = set()
    for event in pages[0][:200]:
        structured = to_structured(to_cloudevent(event, source=SIMULATED_URL,
                                                 instance_uuid=SIMULATED_UUID,
                                                 api_version="8.0.3.0"))
        subjects.add(structured["subject"])
    assert {"EnteredMaintenanceModeEvent", "ExitMaintenanceModeEvent",
            "UserLoginSessionEvent"} <= subjects


def test_keys_continue_after_a_restart() -> None:
    reader = SimulatedReader(begin=datetime.now(UTC), seen=SeenKeys([1, 2, 3]), rate=0,
                             backlog=2)
    assert [e.key for e in reader.poll()] == [4, 5]
