"""``vebaq ingress``: CloudEvents from other sources, over HTTP, into the same pools.

One endpoint (``ingress.path``, ``/`` by default) takes ``POST`` requests in the three modes of
the CloudEvents HTTP binding, parsed with the CloudEvents SDK:

* **binary** — the attributes in ``ce-*`` headers, the data as the body (``Content-Type`` is its
  ``datacontenttype``): what Knative, VEBA's router and most webhooks relays send;
* **structured** — ``Content-Type: application/cloudevents+json``, the event as the body;
* **batch** — ``Content-Type: application/cloudevents-batch+json``, a JSON array of structured
  events, taken **all or nothing**.

Each event then goes the way a vCenter event goes: the triggers route its structured form
(:func:`vebaq.core.routing.route`) to pools, one task message per pool
(:class:`~vebaq.core.messages.TaskMessage`) named after its ``subject`` — or its ``type`` when
it has none — with the task id ``<id>:<pool>``, so that a worker runs each function once per
event id (its done markers), however often the event is posted.

Answers, each with a one-line reason as a ``text/plain`` body:

* ``202`` — only once :meth:`~vebaq.core.publish.Publisher.publish` returned, i.e. Redis holds
  every task of the request (an event no trigger matches is accepted and counted as unrouted,
  as a Knative broker does);
* ``400`` malformed (which event of a batch, and why), ``401`` missing or wrong credentials,
  ``409`` an id that another ``source`` already used, ``411`` no ``Content-Length``, ``413``
  larger than ``ingress.maxRequestBytes``, ``415`` not a CloudEvent content type;
* ``503`` while Redis is unavailable (with ``Retry-After``): nothing of the request was taken —
  the batch is one Redis transaction (``publish(atomic=True)``) — send it again.

Why the ``409``: workers recognise a duplicate by event id alone, as vCenter events' ids are
unique. Another source may number its events ``1``, ``2``, … and a second such source would have
its events taken for duplicates and skipped. So the ingress records each accepted id's source in
Redis (:func:`vebaq.core.keys.ingress_event_source`, kept as long as done markers) and refuses an
id that a different source already used, instead of letting its event vanish.

Credentials (``ingress.token`` for ``Authorization: Bearer``, or ``ingress.username`` and
``ingress.password`` for basic auth) are :class:`~vebaq.core.secrets.Secret` values compared in
constant time; they, and request headers, are never logged. Without credentials the ingress
does not start. This module must not import :mod:`workers` (it produces tasks, as the vCenter
producer does).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import socket
import threading
from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import redis
from celery import Celery
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from kombu.exceptions import KombuError, OperationalError
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vebaq.core import done, keys, replication
from vebaq.core.broker import sender_app
from vebaq.core.config import IngressSettings, Settings
from vebaq.core.envelope import check_time, from_structured, to_structured
from vebaq.core.errors import ConfigError, one_line
from vebaq.core.messages import RESERVED_NAME_PREFIX, TaskMessage, task_name
from vebaq.core.publish import Publisher
from vebaq.core.redisdb import Script, client
from vebaq.core.routing import route
from vebaq.core.secrets import redact_url, scrub

logger = logging.getLogger("vebaq.ingress")

#: Media types of the structured and batch modes (JSON event format only).
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"

#: The attributes binary mode must carry as ``ce-*`` headers (the SDK would invent an ``id``).
REQUIRED_HEADERS = ("ce-specversion", "ce-id", "ce-source", "ce-type")

#: Longest CloudEvent id accepted, in characters (it becomes part of Redis keys and task ids).
MAX_ID_LENGTH = 1024

#: Longest reason sent back or logged, in characters.
MAX_REASON = 300

#: Seconds a client may take to send its request (a slow client cannot hold a thread longer).
REQUEST_TIMEOUT = 30.0

#: Seconds a client is asked to wait (``Retry-After``) after a 503.
RETRY_AFTER = 5

#: Errors that mean "Redis did not take the request".
REDIS_ERRORS = (redis.RedisError, OperationalError, KombuError, ConnectionError, OSError)

#: Checks every id of a request against the sources recorded for it, and only if none belongs to
#: another source records them all (one atomic step). KEYS: the id keys; ARGV[1]: seconds to
#: keep them, ARGV[2…]: each id's source. Returns ``{0}``, or ``{i, recorded source}`` of the
#: first conflicting id.
_CLAIM_IDS = Script("""
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner and owner ~= ARGV[i + 1] then return {i, owner} end
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return {0}
""")

_FORMAT = JSONFormat()


class Refused(Exception):
    """The request is answered with ``status`` and the one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = one_line(reason, MAX_REASON)


def media_type(headers: Mapping[str, str]) -> str:
    """``application/json`` of ``Content-Type: application/json; charset=utf-8``."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _check(event: CloudEvent, where: str) -> CloudEvent:
    if event.get_specversion() != "1.0":
        raise Refused(400, f"{where}unsupported specversion {event.get_specversion()!r} "
                           f"(expected 1.0)")
    if len(event.get_id()) > MAX_ID_LENGTH:
        raise Refused(400, f"{where}id longer than {MAX_ID_LENGTH} characters")
    name = event.get_subject() or event.get_type()
    if name.startswith(RESERVED_NAME_PREFIX):
        raise Refused(400, f"{where}{'subject' if event.get_subject() else 'type'} {name!r}: "
                           f"names starting with {RESERVED_NAME_PREFIX!r} are Celery's own")
    return event


def _binary(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    missing = [h for h in REQUIRED_HEADERS if not headers.get(h)]
    if missing:
        raise Refused(400, f"binary mode: missing header(s) {', '.join(missing)}")
    if headers["ce-specversion"] != "1.0":
        raise Refused(400, f"unsupported specversion {headers['ce-specversion']!r} "
                           f"(expected 1.0)")
    if "ce-time" in headers:
        try:
            check_time(unquote(headers["ce-time"]), "ce-time")
        except ValueError as exc:
            raise Refused(400, f"binary mode: {exc}") from None
    content_type = headers.get("content-type")
    if body and (content_type is None or _FORMAT.JSON_CONTENT_TYPE_PATTERN.match(content_type)):
        try:  # the SDK would quietly keep unparsable JSON as a string
            json.loads(body)
        except RecursionError:
            raise Refused(400, "binary mode: the JSON body is nested too deeply") from None
        except ValueError as exc:
            raise Refused(400, f"binary mode: the body is not the JSON its Content-Type "
                               f"({content_type or 'none: JSON assumed'}) says: {exc}") from None
    try:
        event = ce_http.from_binary(ce_http.HTTPMessage(dict(headers), body), _FORMAT,
                                    CloudEvent)
    except BaseCloudEventException as exc:
        raise Refused(400, f"invalid CloudEvent: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an unreadable ce-time
        raise Refused(400, f"invalid CloudEvent: {exc}") from None
    return _check(event, "")


def _structured(raw: Any, where: str) -> CloudEvent:
    try:
        event = from_structured(raw)
    except ValueError as exc:
        raise Refused(400, f"{where}{exc}") from None
    except RecursionError:
        raise Refused(400, f"{where}the JSON is nested too deeply") from None
    return _check(event, where)


def parse(headers: Mapping[str, str], body: bytes) -> tuple[str, list[CloudEvent]]:
    """The request's mode and its events; raises :class:`Refused` (400 or 415).

    :param headers: the request headers, names in lower case.
    """
    media = media_type(headers)
    if media == BATCH:
        try:
            items = json.loads(body)
        except ValueError as exc:
            raise Refused(400, f"batch: not JSON: {exc}") from None
        except RecursionError:
            raise Refused(400, "batch: the JSON is nested too deeply") from None
        if not isinstance(items, list):
            raise Refused(400, f"batch: expected a JSON array of events, got "
                               f"{type(items).__name__}")
        return "batch", [_structured(item, f"event [{i}]: ") for i, item in enumerate(items)]
    if media == STRUCTURED:
        return "structured", [_structured(body, "")]
    if media.startswith("application/cloudevents"):
        raise Refused(415, f"{media}: only the JSON event format is supported "
                           f"({STRUCTURED}, {BATCH})")
    if any(name.startswith("ce-") for name in headers):
        return "binary", [_binary(headers, body)]
    raise Refused(415, f"not a CloudEvent: expected ce-* headers (binary mode), {STRUCTURED} "
                       f"or {BATCH}, got Content-Type {media or 'none'!r}")


@dataclass(frozen=True)
class Accepted:
    """What one request put into Redis."""

    mode: str
    events: int
    messages: tuple[TaskMessage, ...]
    unrouted: int

    def body(self) -> dict[str, Any]:
        pools = Tally(m.pool for m in self.messages)
        return {"accepted": self.events, "tasks": len(self.messages), "pools": dict(pools),
                "unrouted": self.unrouted}


class IngressMetrics:
    """Counters of one ingress process (own registry: tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vebaq_ingress_requests", "Requests answered, per status",
                                ["status"], registry=r)
        self.events = Counter("vebaq_ingress_events_accepted", "Events accepted", registry=r)
        self.unrouted = Counter("vebaq_ingress_events_unrouted",
                                "Events accepted that no trigger matched (not enqueued)",
                                registry=r)
        self.published = Counter("vebaq_ingress_tasks_published", "Tasks enqueued, per pool",
                                 ["pool"], registry=r)


class Ingress:
    """Turns requests into task messages (the HTTP server is :func:`serve`).

    :param settings: triggers, broker and the ``ingress`` section.
    :param app: the Celery app to publish with (a sender app for the settings by default).
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.config: IngressSettings = settings.ingress
        if not self.config.token and not self.config.username:
            raise ConfigError("ingress: no credentials: set ingress.token (VEBAQ_INGRESS_TOKEN), "
                              "or ingress.username and ingress.password "
                              "(VEBAQ_INGRESS_USERNAME, VEBAQ_INGRESS_PASSWORD)")
        self.app = app or sender_app(settings, "vebaq-ingress")
        self.publisher = Publisher(self.app)
        self.redis = client(settings.broker_url)
        self.metrics = IngressMetrics()
        self.secrets = settings.secrets()

    # --- the steps of a request

    def authorized(self, authorization: str | None) -> bool:
        """Does the ``Authorization`` header carry the configured credentials?"""
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if self.config.token:
            return scheme.lower() == "bearer" and hmac.compare_digest(
                value.encode(), self.config.token.reveal().encode())
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # Both compared, always: the time taken says nothing about which one was wrong.
        user_ok = hmac.compare_digest(user.encode(), (self.config.username or "").encode())
        password_ok = hmac.compare_digest(password.encode(),
                                          self.config.password.reveal().encode())
        return user_ok and password_ok

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` header of a 401."""
        return 'Bearer realm="vebaq"' if self.config.token else 'Basic realm="vebaq"'

    def messages(self, events: Sequence[CloudEvent]) -> tuple[list[TaskMessage], int]:
        """The task messages of ``events`` (one per pool a trigger routes it to), and how many
        events no trigger matched."""
        messages, unrouted = [], 0
        for event in events:
            structured = to_structured(event)
            pools = route(self.settings.triggers, structured)
            if not pools:
                unrouted += 1
            messages += [TaskMessage(task_name(structured), structured, pool) for pool in pools]
        return messages, unrouted

    def claim_ids(self, messages: Sequence[TaskMessage]) -> None:
        """Record each event id's source; raises :class:`Refused` (409) when another source
        already used one of them (see the module docstring)."""
        sources: dict[str, str] = {}
        for message in messages:
            source = str(message.event.get("source"))
            known = sources.setdefault(message.event_id, source)
            if known != source:
                raise Refused(409, f"event id {message.event_id!r} is used by two sources in "
                                   f"this request ({known!r}, {source!r})")
        if not sources:
            return
        ids = list(sources)
        result = _CLAIM_IDS(self.redis, keys=[keys.ingress_event_source(i) for i in ids],
                            args=[done.DONE_TTL, *sources.values()])
        if int(result[0]):
            event_id = ids[int(result[0]) - 1]
            owner = result[1].decode() if isinstance(result[1], bytes) else result[1]
            raise Refused(409, f"event id {event_id!r} was already used by source {owner!r}: "
                               f"vebaq takes events with one id for duplicates, so ids must be "
                               f"unique across sources (use UUIDs)")

    def accept(self, headers: Mapping[str, str], body: bytes) -> Accepted:
        """Parse, route, record ids and enqueue one request; raises :class:`Refused`."""
        mode, events = parse(headers, body)
        messages, unrouted = self.messages(events)
        try:
            self.claim_ids(messages)
            self.publisher.publish(messages, atomic=True)
            replication.confirm(self.redis)  # 202 only for what a failover keeps (if replicated)
        except Refused:
            raise
        except REDIS_ERRORS as exc:
            logger.error("Redis at %s did not take %d event(s): %s: %s",
                         redact_url(self.settings.broker_url), len(events), type(exc).__name__,
                         scrub(str(exc), self.secrets))
            raise Refused(503, "Redis is unavailable: the events were not accepted; send them "
                               "again (duplicates are recognised by id)") from None
        self.metrics.events.inc(len(events))
        self.metrics.unrouted.inc(unrouted)
        for message in messages:
            self.metrics.published.labels(pool=message.pool).inc()
        return Accepted(mode, len(events), tuple(messages), unrouted)

    def healthy(self) -> bool:
        try:
            return bool(self.redis.ping())
        except REDIS_ERRORS:
            return False


class IngressHandler(BaseHTTPRequestHandler):
    """One connection of :func:`serve` (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT
    #: The answer's headers and body go out as two writes: without TCP_NODELAY the body waits
    #: for the client's delayed ACK (about 40 ms per request on a kept-alive connection).
    disable_nagle_algorithm = True
    server: IngressServer
    #: Whether this request's body was read (if not, the connection is closed after the answer).
    body_read = False
    #: Waiting for the next request on a kept-alive connection (closed at once on stop).
    idle = True

    def handle(self) -> None:
        self.server.track(self)
        try:
            self.close_connection = True
            self._one_request()
            while not self.close_connection and not self.server.stopping.is_set():
                self._one_request()
        finally:
            self.server.untrack(self)

    def _one_request(self) -> None:
        self.idle = True
        self.handle_one_request()

    def parse_request(self) -> bool:
        self.idle = False  # a request line arrived: this request is answered, even on stop
        return super().parse_request()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        ingress = self.server.ingress
        self.body_read = False
        try:
            if self.path.split("?", 1)[0] != ingress.config.path:
                raise Refused(404, f"no such path (events go to {ingress.config.path})")
            if not ingress.authorized(self.headers.get("Authorization")):
                raise Refused(401, "missing or wrong credentials")
            body = self._body(ingress.config.max_request_bytes)
            headers = {name.lower(): value for name, value in self.headers.items()}
            accepted = ingress.accept(headers, body)
        except Refused as refused:
            self._refused(refused)
            return
        except Exception:  # a bug must answer 500, log its traceback, and not kill the thread
            logger.exception("POST from %s failed", self.client_address[0])
            self._send(500, "internal error: the events were not accepted (see the ingress log)")
            return
        summary = accepted.body()
        logger.info("accepted %d event(s) (%s) from %s → %d task(s) %s%s", accepted.events,
                    accepted.mode, self.client_address[0], len(accepted.messages),
                    summary["pools"] or "", f", {accepted.unrouted} matched no trigger"
                    if accepted.unrouted else "")
        self._send(202, json.dumps(summary), "application/json")

    def do_GET(self) -> None:  # noqa: N802
        ingress = self.server.ingress
        if self.path == "/healthz":
            ok = ingress.healthy()
            self._send(200 if ok else 503, "ok" if ok else "Redis is unavailable", count=False)
        elif self.path == "/metrics":
            self._send(200, generate_latest(ingress.metrics.registry).decode(),
                       CONTENT_TYPE_LATEST, count=False)
        else:
            self._send(404, f"not found (POST events to {ingress.config.path})", count=False)

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise Refused(411, "Content-Length required (chunked bodies are not accepted)")
        try:
            size = int(length)
        except ValueError:
            raise Refused(400, f"Content-Length {length!r} is not a number") from None
        if size > limit:
            raise Refused(413, f"request of {size} bytes is larger than the limit of {limit} "
                               f"(ingress.maxRequestBytes)")
        body = self.rfile.read(size)
        if len(body) < size:
            raise Refused(400, f"body ended after {len(body)} of {size} bytes")
        self.body_read = True
        return body

    def _refused(self, refused: Refused) -> None:
        reason = scrub(refused.reason, self.server.ingress.secrets)
        level = logging.ERROR if refused.status >= 500 else logging.WARNING
        logger.log(level, "refused POST from %s: %d %s", self.client_address[0], refused.status,
                   reason)
        extra = {}
        if refused.status == 401:
            extra["WWW-Authenticate"] = self.server.ingress.challenge()
        if refused.status == 503:
            extra["Retry-After"] = str(RETRY_AFTER)
        self._send(refused.status, reason, headers=extra)

    def _send(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8",
              headers: Mapping[str, str] | None = None, count: bool = True) -> None:
        body = (text + "\n").encode()
        if count:
            self.server.ingress.metrics.requests.labels(status=str(status)).inc()
        if self.command == "POST" and not self.body_read:
            self.close_connection = True  # the unread body must not be taken for a request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # one line per request is logged above
        pass


class IngressServer(ThreadingHTTPServer):
    """A thread per connection. :meth:`stop` answers the requests in progress, closes the idle
    kept-alive connections (a sender reconnects elsewhere), and returns when all are done: a
    stopped ingress never leaves a request half-answered."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, ingress: Ingress, bind: str, port: int) -> None:
        self.ingress = ingress
        self.stopping = threading.Event()
        self._connections: set[IngressHandler] = set()
        self._connections_lock = threading.Lock()
        super().__init__((bind, port), IngressHandler)

    def track(self, handler: IngressHandler) -> None:
        with self._connections_lock:
            self._connections.add(handler)

    def untrack(self, handler: IngressHandler) -> None:
        with self._connections_lock:
            self._connections.discard(handler)

    def stop(self) -> None:
        """Stop accepting, finish the requests in progress, close the connections."""
        self.stopping.set()
        self.shutdown()
        with self._connections_lock:
            idle = [h for h in self._connections if h.idle]
        for handler in idle:
            with contextlib.suppress(OSError):  # its thread then reads end-of-file and ends
                handler.connection.shutdown(socket.SHUT_RD)
        self.server_close()


def serve(ingress: Ingress, bind: str | None = None, port: int | None = None) -> IngressServer:
    """Start serving on a thread; returns the server (:meth:`IngressServer.stop` stops it).

    :param port: ``0`` picks a free port (``server.server_address[1]``)."""
    config = ingress.config
    server = IngressServer(ingress, config.bind if bind is None else bind,
                           config.port if port is None else port)
    threading.Thread(target=server.serve_forever, name="vebaq-ingress", daemon=True).start()
    return server
