"""Dead letters: events whose functions failed for good, kept in Redis until replayed or purged."""

from __future__ import annotations

import json
import time
import traceback
import uuid
from typing import Any

import redis

from workers.state import PREFIX

#: Hash of dead-letter id → JSON record; the sorted set orders them by time of death.
RECORDS = f"{PREFIX}:dlq:records"
INDEX = f"{PREFIX}:dlq:index"


def add(r: redis.Redis, *, task_name: str, pool: Any, function: str | None, event: Any,
        error: BaseException, attempt: int) -> str:
    """Store one dead letter; returns its id."""
    letter_id = uuid.uuid4().hex[:12]
    now = time.time()
    record = {
        "id": letter_id,
        "task": task_name,
        "pool": pool,
        "function": function,
        "event": event,
        "attempts": attempt,
        "failed_at": now,
        "exception": type(error).__name__,
        "error": str(error)[:2000],
        "traceback": "".join(traceback.format_exception(error))[-4000:],
    }
    pipe = r.pipeline(transaction=True)
    pipe.hset(RECORDS, letter_id, json.dumps(record, default=str))
    pipe.zadd(INDEX, {letter_id: now})
    pipe.execute()
    return letter_id
