"""The log scrubber on 1 MiB of text: every log line passes :func:`vebaq.core.secrets.scrub`,
and the echo function logs the whole event, so an event's size bounds the scrubbing a worker
does for it. Measured on texts without white space (one huge token: what made the old, quadratic
scrubber stall) and on texts dense with URLs, against the floor: one ``str.replace`` pass per
known secret over the same text, which any scrubber of known values pays."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from vebaq.core.secrets import MASK, scrub

#: Bytes of each text.
SIZE = 1024 * 1024
#: Known secrets, as a worker has them (Redis, vCenter, vROps passwords).
SECRETS = ("redis-password-1", "vcenter-password-2", "vrops-password-3")
#: Times each text is scrubbed per repeat (the figure is the mean per pass).
PASSES = 5


def texts() -> dict[str, str]:
    """The inputs, each :data:`SIZE` characters."""
    def filled(unit: str) -> str:
        return (unit * (SIZE // len(unit) + 1))[:SIZE]

    return {
        "one token, no URL": "x" * SIZE,
        "one token of '://'": filled("a://"),
        "URLs with passwords": filled("https://user:pw@host/"),
        "event JSON with URLs": filled('{"Url":"https://admin:secret@vc.example/sdk","K":1},'),
    }


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(PASSES):
        work()
    return (time.perf_counter() - started) / PASSES


def _floor(text: str) -> str:
    for value in SECRETS:
        text = text.replace(value, MASK)
    return text


def measure(profile: Profile) -> dict[str, Any]:
    cases = {}
    for name, text in texts().items():
        scrubbed, floors = [], []
        for _ in range(profile.repeats):
            floors.append(_seconds(lambda t=text: _floor(t)))
            scrubbed.append(_seconds(lambda t=text: scrub(t, SECRETS)))
        cases[name] = {"scrub_ms": summary([s * 1000 for s in scrubbed]),
                       "floor_ms": summary([f * 1000 for f in floors]),
                       "ratio_scrub_to_floor": paired_ratio(scrubbed, floors)}
    return {"bytes": SIZE, "cases": cases}
