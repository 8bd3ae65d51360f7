"""A bench-only pool, ``latency``: records how long after its creation each event reached a
function. Load it with ``VEBAQ_FUNCTIONS=bench.latency_functions`` and route events to it with a
trigger (``triggers: [{name: latency, pool: latency}]``).

Each call appends ``{"id", "message", "latency"}`` (JSON; latency = ``time.time()`` at the
function's start minus the event's ``time``, i.e. vCenter's ``createdTime``) to the list
:data:`SAMPLES`.
"""

from __future__ import annotations

import json
import time

from cloudevents.core.v1.event import CloudEvent

from vebaq.core import redisdb
from workers import settings
from workers.pools import function

#: The Redis list the samples go to (in the broker's database).
SAMPLES = "bench:latency:samples"


@function(pool="latency")
def record_latency(event: CloudEvent) -> None:
    started = time.time()
    created = event.get_time()
    data = event.get_data()
    message = data.get("Message") if isinstance(data, dict) else None
    sample = {"id": event.get_id(), "message": message,
              "latency": started - created.timestamp() if created else None}
    redisdb.client(settings.settings().broker_url).rpush(SAMPLES, json.dumps(sample))
