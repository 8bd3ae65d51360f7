"""HTTP pools: a pool with a ``sink`` POSTs each of its events to a URL as a CloudEvent.

That is what a Knative Trigger's subscriber, an OpenFaaS function or any other CloudEvents
receiver expects, so existing VEBA functions run unchanged: only the URL changes. No Python is
needed; :func:`register_sinks` registers, for every ``pools.<pool>.sink`` of the settings, one
function named :data:`SINK_FUNCTION` in that pool (its done markers and dead letters carry that
name). Route events to the pool with a trigger, and run ``vebaq worker --pool <pool>``.

**Encoding.** The CloudEvents SDK's HTTP binding (:mod:`cloudevents.core.bindings.http`) writes
the request: binary mode by default (attributes as ``ce-*`` headers, the data as the body with
its ``datacontenttype`` as ``Content-Type``), or structured mode (``application/cloudevents+json``).

**Outcome of one POST**, as the pool's retry policy (:mod:`workers.retries`) reads it:

* ``2xx`` — delivered; the worker records it done;
* no answer (connection refused or reset, a connect or read timeout), ``408``, ``429`` and
  ``5xx`` — :class:`SinkUnavailable`: retried with the pool's back-off, or after the server's
  ``Retry-After`` when longer (capped by ``maxRetryAfter``), then dead-lettered;
* any other ``4xx``, a ``3xx`` (redirects are not followed: re-sending a POST elsewhere is the
  configuration's business) and a TLS verification failure — :class:`SinkRejected`, a
  :class:`~vebaq.core.errors.PermanentError`: dead-lettered at once. The dead letter carries
  Knative's ``knativeerrordest`` (the URL), ``knativeerrorcode`` (the status) and
  ``knativeerrordata`` (the answer's body on one line, at most :data:`MAX_ERROR_BODY`
  characters, secrets masked); ``vebaq dlq replay`` sends it again.

**Replies.** A ``2xx`` answer that is itself a CloudEvent (Knative's reply) is ignored and logged
by default (``reply: ignore``). With ``reply: enqueue`` it goes through the triggers and into the
pools like an event from ``vebaq ingress``; if Redis does not take it, the delivery counts as
failed and is retried, so the sink may see the event again (at least once, as with Knative).
Nothing stops a function from replying to its own trigger in a loop: route replies elsewhere.

**Limits.** ``timeout`` bounds connecting and each read of the answer. ``concurrency`` bounds
requests in flight per worker process (a semaphore; a request that waits longer than the timeout
for a slot is retried later): with ``-P threads``, the default for HTTP pools, that is the
pool's limit per worker; each prefork process would have its own. Answers are read up to
:data:`MAX_ANSWER_BYTES`.

**Secrets.** The token, the basic-auth password and header values taken from the environment are
:class:`~vebaq.core.secrets.Secret` values: they reach only the request, never a log line, a
repr, an exception or a dead letter (an answer echoing them is scrubbed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import NoReturn

import requests
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from vebaq.core.broker import sender_app
from vebaq.core.config import Settings, SinkSettings
from vebaq.core.envelope import REQUIRED_ATTRIBUTES, from_structured, to_structured
from vebaq.core.errors import PermanentError
from vebaq.core.messages import TaskMessage, task_name
from vebaq.core.publish import Publisher
from vebaq.core.routing import route
from vebaq.core.secrets import redact_url, scrub
from workers.http_failures import HttpFailure, parse_retry_after, retryable, short_body
from workers.pools import function

logger = logging.getLogger("vebaq.sink")

#: The name of the function :func:`register_sinks` registers in each HTTP pool.
SINK_FUNCTION = "sink"

#: Longest answer body read, in bytes (a reply event, or an error's body).
MAX_ANSWER_BYTES = 1024 * 1024

#: Longest error body kept in a dead letter's ``knativeerrordata``, in characters (Knative's
#: ``KnativeErrorDataExtensionMaxLength``).
MAX_ERROR_BODY = 1024

#: Characters of the body quoted in the exception message (the dead letter keeps more).
MESSAGE_BODY = 200

_FORMAT = JSONFormat()


class SinkUnavailable(HttpFailure):
    """The sink did not answer usefully now (no answer, a timeout, 408/429/5xx): retried."""


class SinkRejected(HttpFailure, PermanentError):
    """The sink refused the event (another 4xx, a redirect, an untrusted certificate):
    retrying cannot help, the event is dead-lettered at once."""


class ReplyPublisher:
    """Enqueues a sink's reply events through the triggers (``reply: enqueue``).

    :param settings: the triggers and the broker; a sender app is made per process on first
        use (a prefork child never shares its parent's connections).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._publishers: dict[int, Publisher] = {}
        self._lock = threading.Lock()

    def _publisher(self) -> Publisher:
        with self._lock:
            pid = os.getpid()
            if pid not in self._publishers:
                self._publishers[pid] = Publisher(sender_app(self.settings, "vebaq-replies"))
            return self._publishers[pid]

    def __call__(self, reply: CloudEvent) -> list[TaskMessage]:
        structured = to_structured(reply)
        messages = [TaskMessage(task_name(structured), structured, pool)
                    for pool in route(self.settings.triggers, structured)]
        self._publisher().publish(messages)
        return messages


class HttpSink:
    """The function of one HTTP pool: POST the event to the sink (see the module docstring).

    :param replies: enqueues reply events (``reply: enqueue``); ``None`` ignores them.
    """

    def __init__(self, pool: str, sink: SinkSettings,
                 replies: ReplyPublisher | None = None) -> None:
        self.pool = pool
        self.sink = sink
        self.url = redact_url(sink.url)
        self.replies = replies
        self.secrets = sink.secrets()
        #: Given with each request: requests lets ``$REQUESTS_CA_BUNDLE`` override a session's.
        self.verify: bool | str = sink.ca_bundle or not sink.insecure_ssl
        self._slots = threading.BoundedSemaphore(sink.concurrency)
        self._sessions: dict[int, requests.Session] = {}
        self._lock = threading.Lock()
        self.__name__ = f"{pool}.{SINK_FUNCTION}"

    def __repr__(self) -> str:
        return f"HttpSink(pool={self.pool!r}, url={self.url!r}, mode={self.sink.mode!r})"

    def _session(self) -> requests.Session:
        """This process's session: its connections are kept alive between events."""
        with self._lock:
            pid = os.getpid()
            session = self._sessions.get(pid)
            if session is None:
                session = requests.Session()
                adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.sink.concurrency)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                if self.sink.insecure_ssl and not self.sink.ca_bundle:
                    logger.warning("pool %s: the sink's TLS certificate is not verified "
                                   "(insecureSSL: true)", self.pool)
                self._sessions[pid] = session
            return session

    def request(self, event: CloudEvent) -> tuple[dict[str, str], bytes]:
        """The headers and body of the POST for ``event``."""
        encode = ce_http.to_structured if self.sink.mode == "structured" else ce_http.to_binary
        message = encode(event, _FORMAT)
        headers = {name: value.reveal() if hasattr(value, "reveal") else value
                   for name, value in self.sink.headers}
        headers.update(message.headers)
        if self.sink.token:
            headers["Authorization"] = f"Bearer {self.sink.token.reveal()}"
        return headers, message.body

    def __call__(self, event: CloudEvent) -> int:
        """Deliver ``event``; returns the status. Raises :class:`SinkUnavailable` (retried) or
        :class:`SinkRejected` (dead-lettered)."""
        headers, body = self.request(event)
        auth = (self.sink.username, self.sink.password.reveal()) if self.sink.username else None
        if not self._slots.acquire(timeout=self.sink.timeout):
            raise SinkUnavailable(f"sink {self.url}: {self.sink.concurrency} request(s) of this "
                                  f"worker process still in flight after {self.sink.timeout:g}s "
                                  f"(concurrency)", url=self.url)
        started = time.monotonic()
        try:
            response = self._session().post(self.sink.url, data=body, headers=headers, auth=auth,
                                            timeout=self.sink.timeout, verify=self.verify,
                                            allow_redirects=False, stream=True)
            try:
                answer = response.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
            finally:
                response.close()
        except requests.exceptions.SSLError as exc:
            raise SinkRejected(f"sink {self.url}: TLS verification failed (set caBundle, or "
                               f"insecureSSL: true for a lab): {self._scrub(exc)}",
                               url=self.url) from None
        except requests.exceptions.Timeout:
            raise SinkUnavailable(f"sink {self.url}: no answer within {self.sink.timeout:g}s "
                                  f"(timeout)", url=self.url) from None
        except (requests.exceptions.RequestException, OSError) as exc:
            raise SinkUnavailable(f"sink {self.url}: {type(exc).__name__}: {self._scrub(exc)}",
                                  url=self.url) from None
        finally:
            self._slots.release()
        status = response.status_code
        elapsed = (time.monotonic() - started) * 1000
        if 200 <= status < 300:  # Celery logs the task's success: this is for debugging
            logger.debug("%s %s → %s: %d in %.0f ms", event.get_subject() or event.get_type(),
                        event.get_id(), self.url, status, elapsed)
            self._reply(event, response.headers, answer)
            return status
        self._fail(status, response, answer)

    def _scrub(self, error: BaseException) -> str:
        return scrub(str(error), self.secrets)

    def _fail(self, status: int, response: requests.Response, answer: bytes) -> NoReturn:
        body = short_body(answer[:MAX_ERROR_BODY * 4].decode("utf-8", "replace"), self.secrets,
                          MAX_ERROR_BODY)
        quoted = body if len(body) <= MESSAGE_BODY else body[:MESSAGE_BODY - 1] + "…"
        message = f"sink {self.url} answered {status} {response.reason or ''}".rstrip()
        message += f": {quoted}" if quoted else ""
        if retryable(status):
            raise SinkUnavailable(message, url=self.url, status=status, body=body,
                                  retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if 300 <= status < 400:
            message += (f" (redirect to {redact_url(response.headers.get('Location', '?'))}: "
                        f"not followed; configure the final URL)")
        raise SinkRejected(message, url=self.url, status=status, body=body)

    def _reply(self, event: CloudEvent, headers: Mapping[str, str], answer: bytes) -> None:
        """Handle a reply event in a 2xx answer, if there is one (see the module docstring)."""
        lowered = {name.lower(): value for name, value in headers.items()}
        structured = lowered.get("content-type", "").startswith("application/cloudevents+json")
        if not structured and not any(name.startswith("ce-") for name in lowered):
            return
        reply = self._parse_reply(lowered, answer, structured)
        if reply is None:
            return
        if self.replies is None:
            logger.info("%s %s: the sink replied with event %s (%s); ignored (reply: ignore)",
                        event.get_subject() or event.get_type(), event.get_id(), reply.get_id(),
                        reply.get_type())
            return
        messages = self.replies(reply)
        logger.info("%s %s: reply event %s (%s) enqueued to %s", event.get_subject() or
                    event.get_type(), event.get_id(), reply.get_id(), reply.get_type(),
                    ", ".join(m.pool for m in messages) or "no pool (no trigger matched)")

    def _parse_reply(self, headers: dict[str, str], answer: bytes,
                     structured: bool) -> CloudEvent | None:
        if len(answer) > MAX_ANSWER_BYTES:
            logger.warning("pool %s: the sink's reply is larger than %d bytes; ignored",
                           self.pool, MAX_ANSWER_BYTES)
            return None
        try:
            if structured:
                return from_structured(answer)
            missing = [a for a in REQUIRED_ATTRIBUTES if not headers.get(f"ce-{a}")]
            if missing:  # the SDK would invent an id
                raise ValueError(f"missing header(s) ce-{', ce-'.join(missing)}")
            return ce_http.from_binary(ce_http.HTTPMessage(headers, answer), _FORMAT, CloudEvent)
        except (BaseCloudEventException, ValueError, TypeError, KeyError) as exc:
            logger.warning("pool %s: the sink replied with an invalid CloudEvent (%s); ignored",
                           self.pool, scrub(str(exc), self.secrets)[:300])
            return None


def register_sinks(settings: Settings) -> set[str]:
    """Register the function of every HTTP pool of ``settings``; returns their names."""
    for pool, sink in settings.sinks.items():
        replies = ReplyPublisher(settings) if sink.reply == "enqueue" else None
        function(pool=pool, name=SINK_FUNCTION)(HttpSink(pool, sink, replies))
    return set(settings.sinks)
