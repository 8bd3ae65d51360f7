"""Enqueueing task messages: Celery protocol-2 messages built once each, sent in pipelines.

Celery's ``send_task`` costs about 180 µs per message (routing, option merging, signals, the
task-sent event through a second kombu publish, and JSON twice), against a few µs for Redis to
take it. :class:`Publisher` writes what they would write, directly, on kombu's own Redis
connection:

* per message, the kombu Redis envelope of a protocol-2 task call — ``{"body": base64(JSON of
  [args, kwargs, embed]), "content-encoding", "content-type", "headers": {task, id, argsrepr,
  kwargsrepr, origin, …}, "properties": {delivery_info, delivery_tag, …}}`` — ``LPUSH``\\ ed to the
  pool's queue list (kombu's direct exchange of a pool routes to the list of its name);
* with ``broker.taskSentEvents`` on (Flower needs them for each task's queue), a ``task-sent``
  event in the same envelope, ``PUBLISH``\\ ed on the event exchange's topic as kombu's fanout
  would (``/<db>.celeryev/task.sent``);
* the event's JSON once per event (compact, UTF-8: :func:`event_json`), however many pools'
  messages carry it, spliced into each body; the caller may keep those texts (``encoded``)
  for the archive, which stores the same JSON; one multi-value ``LPUSH`` per queue and
  pipeline.

:meth:`Publisher.publish` returns only after Redis answered for every message: that is the
confirmation a checkpoint (or a released retry, or a removed dead letter) waits for. Batches are
sent :data:`PIPELINE_SIZE` messages per round trip (bounded memory for huge backlogs). A pipeline
is not a transaction: if the connection breaks during a round trip, Redis may have taken some of
the batch. That is fine where the caller sends the whole batch again (workers suppress the
duplicates by event id), but not where the sender must be told "all or nothing":
``publish(..., atomic=True)`` (``vebaq ingress``) sends the batch as one ``MULTI``/``EXEC``
transaction, which Redis applies whole or not at all.

The format is checked against Celery's own (``tests/test_publish.py`` compares both field by
field, a real worker runs the tasks and a real ``celery events`` receiver sees the task-sent
events). When the broker is not kombu's Redis transport, or the app's settings ask for what this
does not write (another serializer, compression, ``before_task_publish`` receivers), messages go
through Celery's ``send_task`` in one kombu batch as before, slower but the same.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from celery import Celery, signals
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu import Producer
from kombu.transport import redis as kombu_redis
from kombu.utils.json import JSONEncoder

from vebaq.core.messages import TaskMessage, queue_for

logger = logging.getLogger("vebaq.publish")

#: Task messages per pipelined round trip (about 2 MB of commands at most).
PIPELINE_SIZE = 500

#: Publish retries inside kombu (the ``send_task`` path) before a batch is given up (and kept
#: by the caller).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}

#: Redis commands kombu buffers per task message at most on the ``send_task`` path (``LPUSH``,
#: the task-sent event's ``PUBLISH``, a queue's ``PEXPIRE``): an atomic batch is sized so that
#: it never flushes early.
COMMANDS_PER_MESSAGE = 3

#: kombu's JSON encoder (its ``dumps`` makes one per call): plain JSON types as the standard
#: library writes them, and kombu's encodings of dates, UUIDs and decimals, which workers decode.
dumps = JSONEncoder().encode

#: An event's JSON in a body and in the archive: compact, UTF-8 (the body is base64 of UTF-8
#: bytes), kombu's encodings for what plain JSON lacks.
event_json = JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: The routing key of Celery's task-sent events on the event exchange.
TASK_SENT_ROUTING_KEY = "task.sent"

#: The protocol-2 body's third element: no callbacks, errbacks, chain or chord.
_EMBED = ', {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'

#: kombu's delivery modes by Celery's setting values.
_DELIVERY_MODES = {2: 2, "2": 2, "persistent": 2, 1: 1, "1": 1, "transient": 1}


def _tag() -> str:
    """A kombu delivery tag: 128 random bits in UUID form (kombu's are random UUIDs)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


class _Template:
    """A JSON text with holes, made once from a JSON object whose variable values are
    :class:`_Hole`\\ s: :meth:`fill` then only encodes the variable values (the constant rest of
    an envelope is most of its encoding time)."""

    def __init__(self, shape: dict[str, Any]) -> None:
        names: list[str] = []

        def mark(value: Any) -> Any:
            if isinstance(value, _Hole):
                names.append(value.name)
                return f"\x00{len(names) - 1}\x00"
            if isinstance(value, dict):
                return {k: mark(v) for k, v in value.items()}
            return value

        text = dumps(mark(shape))
        self.parts = re.split(r'"\\u0000\d+\\u0000"', text)
        self.names = tuple(names)
        if len(self.parts) != len(self.names) + 1:
            raise AssertionError("a template hole did not survive JSON encoding")

    def fill(self, values: dict[str, str]) -> str:
        """The JSON text with each hole replaced by ``values[name]`` (already JSON)."""
        parts = self.parts
        out = [parts[0]]
        for i, name in enumerate(self.names, 1):
            out.append(values[name])
            out.append(parts[i])
        return "".join(out)


class _Hole:
    def __init__(self, name: str) -> None:
        self.name = name


class RedisWire:
    """Writes task messages as kombu's Redis transport and Celery would (module docstring).

    Built by :meth:`for_app`, which returns ``None`` when the app's broker or settings need
    Celery's own path.
    """

    def __init__(self, app: Celery, channel: kombu_redis.Channel, delivery_mode: int) -> None:
        self.app = app
        self.sent_events = bool(app.conf.task_send_sent_event)
        channel.pool  # noqa: B018 - creating the pool puts the database into the fanout prefix
        exchange = app.conf.event_exchange
        self.topics = tuple(channel._get_publish_topics(exchange, TASK_SENT_ROUTING_KEY))
        hole = _Hole
        #: The kombu envelope of a protocol-2 task call, as Celery's ``send_task`` fills it.
        self.task = _Template({
            "body": hole("body"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": hole("name"), "id": hole("id"), "shadow": None,
                "eta": None, "expires": None, "group": None, "group_index": None,
                "retries": 0, "timelimit": [None, None], "root_id": hole("id"),
                "parent_id": None, "argsrepr": "()", "kwargsrepr": hole("kwargsrepr"),
                "origin": hole("origin"), "ignore_result": None, "replaced_task_nesting": 0,
                "stamped_headers": None, "stamps": {},
            },
            "properties": {
                "correlation_id": hole("id"), "reply_to": hole("reply_to"),
                "delivery_mode": delivery_mode,
                "delivery_info": {"exchange": "", "routing_key": hole("pool")},
                "priority": 0, "body_encoding": "base64", "delivery_tag": hole("tag"),
            },
        })
        #: A ``task-sent`` event's body, as Celery's event dispatcher fills it.
        self.sent_body = _Template({
            "hostname": hole("origin"), "utcoffset": hole("utcoffset"), "pid": hole("pid"),
            "clock": hole("clock"), "uuid": hole("id"), "root_id": hole("id"),
            "parent_id": None, "name": hole("name"), "args": "()", "kwargs": hole("kwargsrepr"),
            "retries": 0, "eta": None, "expires": None, "queue": hole("pool"), "exchange": "",
            "routing_key": hole("pool"), "timestamp": hole("timestamp"), "type": "task-sent",
        })
        #: The kombu envelope of an event (kombu's fanout, transient).
        self.sent = _Template({
            "body": hole("body"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": hole("origin")},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": exchange, "routing_key": TASK_SENT_ROUTING_KEY},
                "priority": 0, "body_encoding": "base64", "delivery_tag": hole("tag"),
            },
        })

    @classmethod
    def for_app(cls, app: Celery, channel: Any) -> RedisWire | None:
        conf = app.conf
        delivery_mode = _DELIVERY_MODES.get(conf.task_default_delivery_mode)
        reasons = [why for why, unusual in (
            ("the broker is not kombu's Redis transport",
             not isinstance(channel, kombu_redis.Channel)),
            ("kombu's Redis channel changed (no _get_publish_topics/_q_for_pri)",
             not all(hasattr(channel, n) for n in ("_get_publish_topics", "_q_for_pri",
                                                   "conn_or_acquire", "_expires"))),
            ("bodies are not base64-encoded", getattr(channel, "body_encoding", "") != "base64"),
            ("task_serializer is not json", conf.task_serializer != "json"),
            ("event_serializer is not json", conf.event_serializer != "json"),
            ("task_compression is set", bool(conf.task_compression)),
            ("task_protocol is not 2", conf.task_protocol != 2),
            ("task_default_delivery_mode is unusual", delivery_mode is None),
        ) if unusual]
        if reasons:
            logger.info("publishing through Celery's send_task: %s", "; ".join(reasons))
            return None
        return cls(app, channel, delivery_mode)

    def send(self, channel: kombu_redis.Channel, messages: Sequence[TaskMessage],
             atomic: bool, encoded: dict[int, str] | None = None) -> None:
        """Send ``messages``; raises redis errors if Redis did not take them all.

        :param encoded: ``id(event)`` → its :func:`event_json`, used and filled."""
        chunk = len(messages) if atomic else PIPELINE_SIZE
        with channel.conn_or_acquire() as client:
            for start in range(0, len(messages), chunk):
                pipe = client.pipeline(transaction=atomic)
                queues, events = self.encode(channel, messages[start:start + chunk], encoded)
                for queue, payloads in queues.items():
                    pipe.lpush(queue, *payloads)
                for payload in events:
                    for topic in self.topics:
                        pipe.publish(topic, payload)
                pipe.execute()

    def encode(self, channel: kombu_redis.Channel, messages: Sequence[TaskMessage],
               encoded: dict[int, str] | None = None) -> tuple[dict[str, list[str]], list[str]]:
        """The messages' envelopes by queue list (in order) and their task-sent events
        (``encoded``: as for :meth:`send`)."""
        q = encode_basestring_ascii
        fixed = {"origin": q(anon_nodename()), "reply_to": q(self.app.thread_oid),
                 "pid": str(os.getpid()), "utcoffset": dumps(utcoffset())}
        clock, sent_events = self.app.clock, self.sent_events
        task, sent, sent_body = self.task, self.sent, self.sent_body
        queues: dict[str, list[str]] = {}
        events: list[str] = []
        texts: dict[int, str] = {} if encoded is None else encoded  # once per event
        for message in messages:
            event = message.event
            text = texts.get(id(event))
            if text is None:
                text = texts[id(event)] = event_json(event)
            pool = message.pool
            kwargs = message.kwargs()
            del kwargs["event"]
            # {"pool": …} alone (a first delivery) is most messages: no encoder needed for it.
            rest = f'"pool": {q(pool)}}}' if len(kwargs) == 1 else dumps(kwargs)[1:]
            values = {**fixed, "id": q(message.task_id), "name": q(message.subject),
                      "pool": q(pool), "kwargsrepr": q(message.summary()),
                      "body": q(_b64(f'[[], {{"event": {text}, {rest}{_EMBED}')),
                      "tag": q(_tag())}
            queues.setdefault(channel._q_for_pri(pool, 0), []).append(task.fill(values))
            if sent_events:
                values["clock"], values["timestamp"] = str(clock.forward()), repr(time.time())
                values["body"] = q(_b64(sent_body.fill(values)))
                values["tag"] = q(_tag())
                events.append(sent.fill(values))
        return queues, events


def _make_transactional(producer: Producer) -> None:
    """Turn the producer's active publish batch into a ``MULTI``/``EXEC`` transaction.

    kombu (≥ 5.7) buffers a batch in a redis-py pipeline created with ``transaction=False``;
    redis-py reads that flag when the pipeline runs, so setting it before the flush is enough.
    Raises ``RuntimeError`` when kombu's batch is not what this expects (the batch is then
    discarded, nothing sent) rather than silently sending a partial batch."""
    state = getattr(getattr(producer, "_batch_local", None), "current", None)
    pipeline = getattr(getattr(state, "session", None), "pipeline", None)
    if pipeline is None or not hasattr(pipeline, "transaction"):
        raise RuntimeError("cannot publish atomically: kombu's publish batch is not a redis-py "
                           "pipeline (kombu changed, or the transport does not batch)")
    pipeline.transaction = True


class Publisher:
    """Sends :class:`~vebaq.core.messages.TaskMessage` batches with ``app``'s broker."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._declared: set[str] = set()
        self._wire: RedisWire | None = None
        self._wire_checked = False

    def declare(self, pools: Iterable[str]) -> None:
        """Create the pools' queue bindings, so messages sent before a worker ever started
        are routed and kept."""
        missing = [p for p in dict.fromkeys(pools) if p not in self._declared]
        if not missing:
            return
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for pool in missing:
                queue_for(pool)(channel).declare()
                self._declared.add(pool)

    def publish(self, messages: Sequence[TaskMessage], atomic: bool = False,
                encoded: dict[int, str] | None = None) -> int:
        """Enqueue every message; returns how many were sent.

        Raises kombu/redis errors if Redis did not take them all; the caller keeps the batch and
        sends it again later (workers suppress duplicates by event id and function).

        :param atomic: send the batch as one Redis transaction: on an error Redis took none of
            it (the batch must fit in memory; ``vebaq ingress`` bounds it by its request size).
        :param encoded: filled with ``id(event)`` → the event's :func:`event_json` (what the
            archive stores), for events the fast path encoded; the caller keeps the events
            alive while it uses it.
        """
        if not messages:
            return 0
        self.declare(m.pool for m in messages)
        with self.app.producer_or_acquire() as producer:
            channel = producer.channel
            wire = self._wire_for(channel)
            if wire is not None and not self._needs_celery(channel, messages):
                wire.send(channel, messages, atomic, encoded)
            else:
                self._send_tasks(producer, messages, atomic)
        return len(messages)

    def _wire_for(self, channel: Any) -> RedisWire | None:
        if not self._wire_checked:
            self._wire = RedisWire.for_app(self.app, channel)
            self._wire_checked = True
        return self._wire

    @staticmethod
    def _needs_celery(channel: kombu_redis.Channel, messages: Sequence[TaskMessage]) -> bool:
        """Whether Celery's path must send these: someone hooks into task publishing (tracing
        libraries add headers there), or a queue expires (kombu then refreshes its TTL)."""
        if signals.before_task_publish.receivers or signals.after_task_publish.receivers:
            return True
        expiring = channel._expires
        return bool(expiring) and any(m.pool in expiring for m in messages)

    def _send_tasks(self, producer: Producer, messages: Sequence[TaskMessage],
                    atomic: bool) -> None:
        """Celery's own path: ``send_task`` per message, in one kombu publish batch."""
        size = COMMANDS_PER_MESSAGE * len(messages) + 1 if atomic else \
            COMMANDS_PER_MESSAGE * PIPELINE_SIZE
        with producer.batch(max_size=size):
            for message in messages:
                self.app.send_task(
                    message.subject,
                    kwargs=message.kwargs(),
                    task_id=message.task_id,
                    queue=queue_for(message.pool),
                    declare=[],  # declared once, above: not once per message
                    producer=producer,
                    retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY,
                    argsrepr="()",
                    kwargsrepr=message.summary(),
                )
            if atomic:
                _make_transactional(producer)
