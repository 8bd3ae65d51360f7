"""Dead letters: events whose functions failed for good, kept in Redis until replayed or purged.

A function's event is dead-lettered after its last retry, at once for a
:class:`~vebaq.core.errors.PermanentError`; a task message that is unusable (not a CloudEvent,
no or unknown pool) is dead-lettered as it is, and so is a vCenter event the producer could not
convert (replayed by converting it again: ``producer.unconverted``). A record holds everything
needed to understand and replay the failure: the full CloudEvent, the task name (the event
subject), pool, function, attempts, first and last failure time, the exception's type, message
and (shortened) traceback, and the Knative error extensions (``knativeerrordest``,
``knativeerrorcode``, ``knativeerrordata``) when the exception offers them through
``knative_error_attributes()``.

Records stay until :func:`replay` or :func:`purge` removes them: there is no expiry. They are
only as durable as Redis is: run it with AOF persistence (``appendonly yes``, ``appendfsync
everysec``) and ``maxmemory-policy noeviction``, or a Redis restart or eviction loses them.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis

from vebaq.core import keys
from vebaq.core.errors import NoSuchDeadLetter, NotReplayable
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from vebaq.core.redisdb import Script

RECORDS = keys.DEAD_LETTER_RECORDS
INDEX = keys.DEAD_LETTER_INDEX
#: Kept with every add and remove, so that :func:`counts` (scraped for metrics) never reads the
#: records.
COUNTS = keys.DEAD_LETTER_COUNTS

#: Seconds one replay of a dead letter holds it (:func:`replay` is exclusive per id).
REPLAY_LOCK_TTL = 60

#: Longest exception message kept, in characters.
MAX_ERROR = 2000
#: Longest traceback kept, in characters (the end is kept: the innermost frames).
MAX_TRACEBACK = 4000
#: The Knative error extensions copied from ``error.knative_error_attributes()``.
KNATIVE_ATTRIBUTES = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")

#: Records read per round trip when listing.
_CHUNK = 500

# Remove one record and its index entry; decrement its counter only if it was still there, so
# two concurrent removals (replay racing purge) count it once.
_REMOVE = Script("""
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
return 1
""")


def describe(error: BaseException) -> str:
    """``Type: message``, shortened to :data:`MAX_ERROR`."""
    return f"{type(error).__name__}: {error}"[:MAX_ERROR]


def knative_attributes(error: BaseException) -> dict[str, Any]:
    """The Knative error extensions ``error`` offers (none if it has no such method)."""
    method = getattr(error, "knative_error_attributes", None)
    if not callable(method):
        return {}
    try:
        attributes = method() or {}
    except Exception:  # a broken helper must not stop the dead-lettering
        return {}
    return {k: attributes[k] for k in KNATIVE_ATTRIBUTES if k in attributes}


def _count_field(subject: Any, pool: Any) -> str:
    return json.dumps([subject, pool], default=str)


def add(r: redis.Redis, *, task_name: str, pool: Any, function: str | None, event: Any,
        error: BaseException, attempt: int, first_failed_at: float | None = None,
        task_id: str | None = None, message: dict[str, Any] | None = None,
        force: str | None = None) -> str:
    """Store one dead letter; returns its id.

    :param task_name: the Celery task name, i.e. the event subject.
    :param pool: the pool the message was sent to (anything, for a poison message).
    :param function: the function that failed; ``None`` when the message itself was unusable.
    :param event: the ``event`` argument as received (the structured CloudEvent).
    :param error: the exception of the last attempt.
    :param attempt: how many times the function ran (1 for a permanent error on first try).
    :param first_failed_at: epoch seconds of the first failure (default: now).
    :param task_id: the id of the Celery task that gave up, to find it in Flower.
    :param message: what is known of a message that never became a task call (headers, body),
        kept under ``"message"``.
    :param force: the token of the forced replay that failed: replaying the dead letter forces
        the function again (its done marker is the one of the run before the fix).
    """
    letter_id = uuid.uuid4().hex[:12]
    now = time.time()
    record = {
        "id": letter_id,
        "task": task_name,
        "pool": pool,
        "function": function,
        "event": event,
        "attempts": attempt,
        "first_failed_at": first_failed_at or now,
        "last_failed_at": now,
        "failed_at": now,
        "task_id": task_id,
        "exception": type(error).__name__,
        "error": str(error)[:MAX_ERROR],
        "traceback": "".join(traceback.format_exception(error))[-MAX_TRACEBACK:],
        **knative_attributes(error),
    }
    if message is not None:
        record["message"] = message
    if force:
        record["force"] = force
    pipe = r.pipeline(transaction=True)
    pipe.hset(RECORDS, letter_id, json.dumps(record, default=str))
    pipe.zadd(INDEX, {letter_id: now})
    pipe.hincrby(COUNTS, _count_field(task_name, pool), 1)
    pipe.execute()
    return letter_id


def _records(r: redis.Redis) -> Iterator[dict[str, Any]]:
    ids = [i.decode() for i in r.zrange(INDEX, 0, -1)]
    for start in range(0, len(ids), _CHUNK):
        for raw in r.hmget(RECORDS, ids[start:start + _CHUNK]):
            if raw is not None:  # removed since the index was read
                yield json.loads(raw)


def list_letters(r: redis.Redis, subject: str | None = None,
                 pool: str | None = None) -> list[dict[str, Any]]:
    """The dead letters, oldest first; ``subject``/``pool`` keep only those matching."""
    return [rec for rec in _records(r)
            if (subject is None or rec.get("task") == subject)
            and (pool is None or rec.get("pool") == pool)]


def get(r: redis.Redis, letter_id: str) -> dict[str, Any]:
    """One record; raises :class:`NoSuchDeadLetter`."""
    raw = r.hget(RECORDS, letter_id)
    if raw is None:
        raise NoSuchDeadLetter(f"no dead letter {letter_id!r} (see `vebaq dlq list`)")
    return json.loads(raw)


def remove(r: redis.Redis, record: dict[str, Any]) -> bool:
    """Delete ``record`` (as returned by :func:`get`); ``False`` if it was already gone."""
    return bool(_REMOVE(r, keys=[RECORDS, INDEX, COUNTS],
                        args=[record["id"], _count_field(record.get("task"), record.get("pool"))]))


def replay(publisher: Publisher, r: redis.Redis, letter_id: str,
           messages_for: Callable[[dict[str, Any]], Sequence[TaskMessage]] | None = None
           ) -> list[str]:
    """Send the dead letter's event to its pool again, as a first attempt of the function that
    failed (of every function, for a poison message), and delete the record once the broker
    took the message. Returns the new task ids.

    :param messages_for: makes the messages from the record (default: :func:`replay_message`;
        the producer's dead letters are converted again, :mod:`producer.unconverted`).

    Exclusive per id: a second replay of the same dead letter while one runs (two operators, two
    terminals) finds it taken and raises :class:`NoSuchDeadLetter`, so one task is sent. The
    event's done markers need no clearing: they are set only when a function succeeded.
    """
    lock = keys.dead_letter_replay_lock(letter_id)
    if not r.set(lock, 1, nx=True, ex=REPLAY_LOCK_TTL):
        raise NoSuchDeadLetter(f"dead letter {letter_id!r} is being replayed by another command")
    try:
        record = get(r, letter_id)
        messages = (messages_for or (lambda rec: [replay_message(rec)]))(record)
        publisher.publish(messages)
        remove(r, record)
        return [message.task_id for message in messages]
    finally:
        r.delete(lock)


def replay_message(record: dict[str, Any]) -> TaskMessage:
    """The task message that replays ``record``; raises :class:`NotReplayable`."""
    pool, event = record.get("pool"), record.get("event")
    if not isinstance(pool, str) or not pool or not isinstance(event, dict) or not event.get("id"):
        raise NotReplayable(f"dead letter {record.get('id')} has no event or no pool "
                            f"(pool={pool!r}): a message that was never a task call cannot be "
                            "replayed; purge it")
    functions = (record["function"],) if record.get("function") else None
    return TaskMessage(str(record.get("task") or event.get("subject")), event, pool,
                       functions=functions, id_suffix=f"replay-{uuid.uuid4().hex[:8]}",
                       force=record.get("force") or None)


def purge(r: redis.Redis, ids: Iterable[str] | None = None) -> int:
    """Delete the dead letters ``ids`` (all of them when ``None``); returns how many went."""
    if ids is None:
        pipe = r.pipeline(transaction=True)
        pipe.zcard(INDEX)
        pipe.delete(RECORDS, INDEX, COUNTS)
        return int(pipe.execute()[0])
    removed = 0
    for letter_id in ids:
        raw = r.hget(RECORDS, letter_id)
        if raw is not None and remove(r, json.loads(raw)):
            removed += 1
    return removed


def counts(r: redis.Redis) -> dict[tuple[Any, Any], int]:
    """Dead letters per ``(subject, pool)``, for metrics."""
    result = {}
    for field, value in r.hgetall(COUNTS).items():
        subject, pool = json.loads(field)
        if int(value) > 0:
            result[(subject, pool)] = int(value)
    return result


def depth(r: redis.Redis) -> int:
    """How many dead letters there are."""
    return int(r.zcard(INDEX))
