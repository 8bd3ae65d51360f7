"""A CloudEvents receiver made only of the CloudEvents SDK and the standard library's HTTP server:
the stand-in for an existing Knative function (VEBA's kn-py-echo parses requests the same way,
with the SDK's ``from_http``). It imports nothing of vebaq, so what it accepts is what any
CloudEvents receiver accepts.

It records every request (:class:`Delivery`) and answers each event id from a script
(:attr:`Receiver.plan`: the answers for its successive attempts), else :attr:`Receiver.default`.
``GET /_stats`` gives its counts as JSON; ``python -m tests.cloudevent_receiver --port N`` runs
one in its own process (the benchmark's sink).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cloudevents.v1.conversion import to_binary
from cloudevents.v1.http import CloudEvent, from_http


@dataclass(frozen=True)
class Answer:
    """What the receiver answers to one request.

    :param delay: seconds to wait before answering (a hung function).
    :param reply: attributes and data of a CloudEvent to reply with (Knative's reply).
    """

    status: int = 200
    body: str = ""
    delay: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    reply: tuple[dict[str, Any], Any] | None = None


@dataclass(frozen=True)
class Delivery:
    """One request as received: ``mode`` is ``binary`` or ``structured``."""

    path: str
    mode: str
    headers: dict[str, str]
    body: bytes
    attributes: dict[str, Any]
    data: Any
    status: int
    received_at: float = field(default_factory=time.time)

    @property
    def event_id(self) -> str:
        return str(self.attributes.get("id"))


class Receiver:
    """A threaded HTTP server on ``127.0.0.1`` (a free port by default).

    :param token: when set, requests without ``Authorization: Bearer <token>`` get 401.
    :param record: keep every :class:`Delivery` (off for load: only the counts are kept).
    :param tls: ``(certificate file, key file)``: serve HTTPS.
    """

    def __init__(self, port: int = 0, token: str | None = None, record: bool = True,
                 tls: tuple[str, str] | None = None) -> None:
        self.token = token
        self.record = record
        self.in_flight = 0
        self.max_in_flight = 0
        self.plan: dict[str, list[Answer]] = {}
        self.default = Answer()
        self.deliveries: list[Delivery] = []
        self.attempts: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes

            def do_GET(self) -> None:  # noqa: N802
                self._answer(Answer(200, json.dumps(receiver.stats())))

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver.token and headers.get("authorization") != f"Bearer {receiver.token}":
                    self._answer(Answer(401, "no or wrong token"))
                    return
                try:
                    event = from_http(headers, body)
                except Exception as exc:  # what kn-py-echo does: 400 on a decode error
                    self._answer(Answer(400, f"not a CloudEvent: {exc}"))
                    return
                attributes = dict(event.get_attributes())
                answer = receiver.next_answer(attributes["id"])
                with receiver.lock:
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                mode = "structured" if headers.get("content-type", "").startswith(
                    "application/cloudevents+json") else "binary"
                receiver.note(Delivery(self.path, mode, headers, body, attributes,
                                       event.get_data(), answer.status))
                try:
                    if answer.delay:
                        time.sleep(answer.delay)
                    self._answer(answer, headers)
                finally:
                    with receiver.lock:
                        receiver.in_flight -= 1

            def _answer(self, answer: Answer, request: dict[str, str] | None = None) -> None:
                body = answer.body.encode()
                headers = dict(answer.headers)
                if answer.reply is not None:
                    reply_headers, body = to_binary(CloudEvent(*answer.reply))
                    headers.update(reply_headers)
                if "{authorization}" in answer.body and request:  # a server echoing the request
                    body = answer.body.replace("{authorization}",
                                               request.get("authorization", "")).encode()
                try:
                    self.send_response(answer.status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def next_answer(self, event_id: str) -> Answer:
        with self.lock:
            planned = self.plan.get(event_id)
            return planned.pop(0) if planned else self.default

    def note(self, delivery: Delivery) -> None:
        with self.lock:
            self.attempts[delivery.event_id] += 1
            if 200 <= delivery.status < 300:
                self.accepted[delivery.event_id] += 1
            if self.record:
                self.deliveries.append(delivery)

    def stats(self) -> dict[str, int]:
        """Events answered 2xx (each once), all requests, and requests beyond an event's first."""
        with self.lock:
            attempts = sum(self.attempts.values())
            return {"delivered": len(self.accepted), "requests": attempts,
                    "repeated": attempts - len(self.attempts)}

    def of(self, event_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.event_id == event_id]

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main() -> None:
    """``python -m tests.cloudevent_receiver --port N``: serve until killed, answering 200."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    receiver = Receiver(args.port, record=False).start()
    print(f"receiver listening on {receiver.url}", flush=True)
    receiver.thread.join()


if __name__ == "__main__":
    main()
