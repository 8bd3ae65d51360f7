"""Test-only ``ha`` pool (``VEBAQ_FUNCTIONS=tests.ha_functions``) for the failover test and the
chaos soak.

Its function writes its *effect* outside Redis — one line ``<event id> <pid> <label>`` (the
label: ``soak-<n>`` from the event's message, or ``-``) appended to
``$VEBAQ_TEST_EFFECTS`` per run (``O_APPEND``: lines of concurrent processes never mix) — so that
what a Redis failover loses cannot hide what the function did. Several lines for one id are
duplicate effects: runs the done markers did not suppress.

By the text of the vCenter event's message:

* ``flaky``: the first run fails (recorded in ``$VEBAQ_TEST_EFFECTS.failed``), the retry
  succeeds — retries must carry on across the failover;
* ``doomed``: fails permanently — it must end in the dead letters;
* anything else: succeeds.

``VEBAQ_TEST_WORK`` seconds of sleep per run give a ``kill -9`` something to interrupt.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

from cloudevents.core.v1.event import CloudEvent

from workers.errors import PermanentError
from workers.pools import function

#: Seconds each run takes.
WORK = float(os.environ.get("VEBAQ_TEST_WORK", "0.01"))


#: The chaos soak's label of an event, in its message.
LABEL = re.compile(r"soak-[0-9]+")


def label_of(text: str) -> str:
    match = LABEL.search(text)
    return match.group() if match else "-"


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def message_of(event: CloudEvent) -> str:
    data = event.get_data()
    return str(data.get("FullFormattedMessage") or data.get("Message") or "") \
        if isinstance(data, dict) else ""


@function(pool="ha")
def record(event: CloudEvent) -> None:
    effects = os.environ["VEBAQ_TEST_EFFECTS"]
    text = message_of(event)
    if "doomed" in text:
        raise PermanentError("doomed on purpose")
    if "flaky" in text:
        failed = f"{effects}.failed"
        if event.get_id() not in runs(Path(failed)):
            _append(failed, f"{event.get_id()} {os.getpid()}")
            raise RuntimeError("flaky: the first run fails on purpose")
    time.sleep(WORK)
    _append(effects, f"{event.get_id()} {os.getpid()} {label_of(text)}")


def runs(path: Path, by_label: bool = False) -> Counter[str]:
    """Event id (or label) → number of effect lines in ``path`` (none if it does not exist)."""
    if not path.exists():
        return Counter()
    column = 2 if by_label else 0
    return Counter(fields[column] for fields in (line.split(" ")
                                                 for line in path.read_text().splitlines())
                   if len(fields) > column)
