"""A small, faithful fake of the vRealize Operations suite-api, served over real HTTP.

It implements what the ``vrops`` pool uses, with the shapes of the real API:

* ``POST /suite-api/api/auth/token/acquire`` — ``{"username", "password", "authSource"?}`` →
  ``{"token", "validity" (epoch ms), "expiresAt", "roles"}``; 401 on bad credentials;
* ``POST /suite-api/api/auth/token/release`` — invalidates the caller's token;
* ``GET /suite-api/api/adapterkinds/VMWARE/resourcekinds/HostSystem/resources?name=…`` — a
  case-insensitive *substring* match, like vROps, answering ``{"resourceList": [...]}`` with
  ``identifier``, ``resourceKey{name, adapterKindKey, resourceKindKey, resourceIdentifiers[]}``
  and ``resourceStatusStates[].resourceState`` (``STARTED`` / ``MAINTAINED_MANUAL``);
* ``PUT`` / ``DELETE /suite-api/api/resources/{id}/maintained`` — 200, or 404 for an unknown id.

Every suite-api call except the token acquire needs ``Authorization: vRealizeOpsToken <t>`` (or
``OpsToken <t>``); a missing, unknown, released or expired token gets 401.

Faults, set with :meth:`FakeVrops.configure` or ``POST /_fake/config`` (JSON, same names), apply
to suite-api calls only: ``latency`` (seconds before answering), ``fail_rate`` (probability of a
``fail_status`` answer), ``throttle_rate`` (probability of 429 with ``Retry-After:
retry_after``), ``fail_next`` / ``throttle_next`` (the next N calls fail, deterministically),
``down`` (the connection is closed without an answer) and ``token_ttl``. ``GET /_fake/state``
shows the resources, call counts and history; ``POST /_fake/hosts`` adds a host.

Use it from tests::

    with FakeVrops(hosts=[("esx01", "host-19", vc_uuid)], token_ttl=2) as fake:
        ... fake.url ..., fake.state(fake.resource_id("host-19", vc_uuid)), fake.calls

or run it for a demo:
``python -m vebaq.devtools.fake_vrops --port 8090 --host esx01=host-19@<vc uuid>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("vebaq.fake_vrops")

#: Credentials the fake accepts unless told otherwise (those of the VEBA walkthrough's demo).
DEFAULT_USERNAME = "admin"
DEFAULT_PASSWORD = "VMware1!"

#: Seconds a token lives; real vROps uses 6 hours.
DEFAULT_TOKEN_TTL = 6 * 3600.0

#: ``resourceState`` of a host that is, or is not, marked maintained.
STARTED = "STARTED"
MAINTAINED = "MAINTAINED_MANUAL"

#: Call-counter names, one per endpoint (see :attr:`FakeVrops.calls`).
TOKEN_ACQUIRE = "token_acquire"
TOKEN_RELEASE = "token_release"
RESOURCE_QUERY = "resource_query"
MAINTAINED_PUT = "maintained_put"
MAINTAINED_DELETE = "maintained_delete"
UNKNOWN = "unknown"

#: Namespace of the resource ids: the same host always gets the same id.
RESOURCE_NAMESPACE = uuid.UUID("0b5e7c44-8f2a-5b6e-9d1c-76726f707366")

_HOSTS_PATH = "/suite-api/api/adapterkinds/VMWARE/resourcekinds/HostSystem/resources"
_MAINTAINED_PATH = re.compile(r"^/suite-api/api/resources/(?P<id>[^/]+)/maintained$")
_MALFORMED = object()  # a request body that is not JSON
_AUTH_HEADER = re.compile(r"^\s*(?:vRealizeOpsToken|OpsToken)\s+(?P<token>\S+)\s*$")

#: The fault switches and their types (what :meth:`FakeVrops.configure` accepts).
SWITCHES: dict[str, type] = {
    "latency": float,
    "fail_rate": float,
    "fail_status": int,
    "throttle_rate": float,
    "retry_after": int,
    "fail_next": int,
    "throttle_next": int,
    "down": bool,
    "token_ttl": float,
}


@dataclass
class Host:
    """One ``HostSystem`` resource.

    :param name: the ESXi host name as vCenter shows it (``resourceKey.name``).
    :param moref: the vCenter managed object id, ``host-19`` (``VMEntityObjectID``).
    :param vc_uuid: the vCenter instance UUID (``VMEntityVCID``).
    """

    name: str
    moref: str
    vc_uuid: str
    identifier: str = ""
    state: str = STARTED

    def to_json(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "resourceKey": {
                "name": self.name,
                "adapterKindKey": "VMWARE",
                "resourceKindKey": "HostSystem",
                "resourceIdentifiers": [
                    {"identifierType": {"name": "VMEntityName", "dataType": "STRING",
                                        "isPartOfUniqueness": False}, "value": self.name},
                    {"identifierType": {"name": "VMEntityObjectID", "dataType": "STRING",
                                        "isPartOfUniqueness": True}, "value": self.moref},
                    {"identifierType": {"name": "VMEntityVCID", "dataType": "STRING",
                                        "isPartOfUniqueness": True}, "value": self.vc_uuid},
                ],
            },
            "resourceStatusStates": [{"adapterInstanceId": str(uuid.uuid5(
                RESOURCE_NAMESPACE, self.vc_uuid)), "resourceStatus": "DATA_RECEIVING",
                "resourceState": self.state}],
            "resourceHealth": "GREEN",
            "dtEnabled": True,
            "badges": [],
            "relatedResources": [],
            "links": [],
        }


@dataclass
class Faults:
    """The fault switches (see the module docstring)."""

    latency: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 503
    throttle_rate: float = 0.0
    retry_after: int = 1
    fail_next: int = 0
    throttle_next: int = 0
    down: bool = False
    token_ttl: float = DEFAULT_TOKEN_TTL


@dataclass
class Change:
    """One successful maintained PUT or DELETE (the fake's history)."""

    at: float
    resource: str
    name: str
    method: str
    before: str
    after: str


class FakeVrops:
    """The fake server; start it with :meth:`start` or ``with``.

    :param hosts: ``(name, moref, vc_uuid)`` triples to create, all ``STARTED``.
    :param username: the account that may acquire tokens.
    :param password: its password.
    :param auth_source: if set, the ``authSource`` a token request must name.
    :param token_ttl: seconds a token is valid.
    :param seed: seeds the random faults, so a failing test can be replayed.
    :param host: address to bind; loopback by default.
    :param port: 0 picks a free port (see :attr:`url`).
    """

    def __init__(self, hosts: Iterable[tuple[str, str, str]] = (), *,
                 username: str = DEFAULT_USERNAME, password: str = DEFAULT_PASSWORD,
                 auth_source: str | None = None, token_ttl: float = DEFAULT_TOKEN_TTL,
                 seed: int | None = 0, host: str = "127.0.0.1", port: int = 0,
                 **faults: Any) -> None:
        self.username = username
        self._password = password
        self.auth_source = auth_source
        self.bind = (host, port)
        self.faults = Faults(token_ttl=token_ttl)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._hosts: dict[str, Host] = {}
        self._tokens: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.history: list[Change] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for name, moref, vc_uuid in hosts:
            self.add_host(name, moref, vc_uuid)
        if faults:
            self.configure(**faults)

    def __repr__(self) -> str:
        return f"FakeVrops(url={self.url if self._server else None!r}, hosts={len(self._hosts)})"

    # --- lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the vROps base URL, without ``/suite-api``)."""
        if self._server is None:
            raise RuntimeError("FakeVrops is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeVrops:
        if self._server is None:
            self._server = _Server(self.bind, _Handler)
            self._server.fake = self
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name="fake-vrops", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeVrops:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the Python API tests use

    def add_host(self, name: str, moref: str, vc_uuid: str) -> str:
        """Create a ``STARTED`` host resource (idempotent); returns its resource id."""
        identifier = str(uuid.uuid5(RESOURCE_NAMESPACE, f"{vc_uuid.lower()}/{moref}"))
        with self._lock:
            self._hosts.setdefault(identifier, Host(name, moref, vc_uuid, identifier))
        return identifier

    def resource_id(self, moref: str, vc_uuid: str) -> str:
        """The id of the host ``moref`` of vCenter ``vc_uuid``; ``KeyError`` if there is none."""
        identifier = str(uuid.uuid5(RESOURCE_NAMESPACE, f"{vc_uuid.lower()}/{moref}"))
        with self._lock:
            if identifier not in self._hosts:
                raise KeyError(f"no host {moref} of vCenter {vc_uuid}")
        return identifier

    def state(self, resource_id: str) -> str:
        """``STARTED`` or ``MAINTAINED_MANUAL``."""
        with self._lock:
            return self._hosts[resource_id].state

    def host_state(self, moref: str, vc_uuid: str) -> str:
        return self.state(self.resource_id(moref, vc_uuid))

    def configure(self, **switches: Any) -> None:
        """Set fault switches, e.g. ``configure(fail_rate=0.2, latency=0.01)``."""
        unknown = set(switches) - set(SWITCHES) - {"seed"}
        if unknown:
            raise ValueError(f"unknown switch {sorted(unknown)[0]!r} "
                             f"(expected one of {', '.join(SWITCHES)}, seed)")
        with self._lock:
            for name, value in switches.items():
                if name == "seed":
                    self._random.seed(value)
                else:
                    setattr(self.faults, name, SWITCHES[name](value))

    def reset_calls(self) -> None:
        """Zero the call and injected-fault counters and forget the history."""
        with self._lock:
            self.calls.clear()
            self.injected.clear()
            self.history.clear()

    def total_calls(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def expire_tokens(self) -> None:
        """Make every issued token expired (as if its validity had passed)."""
        with self._lock:
            self._tokens = dict.fromkeys(self._tokens, 0.0)

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /_fake/state`` answers."""
        with self._lock:
            return {
                "resources": {h.identifier: {"name": h.name, "moref": h.moref,
                                             "vcUuid": h.vc_uuid, "resourceState": h.state}
                              for h in self._hosts.values()},
                "calls": dict(self.calls),
                "injected": dict(self.injected),
                "history": [vars(c) for c in self.history],
                "faults": vars(self.faults).copy(),
                "tokens": len(self._tokens),
            }

    # --- request handling (called by the handler threads)

    def _count(self, endpoint: str) -> None:
        with self._lock:
            self.calls[endpoint] += 1

    def _fault(self) -> tuple[str, int] | None:
        """The fault to inject into this call, if any: ``("down"|"5xx"|"429", status)``."""
        with self._lock:
            f = self.faults
            if f.down:
                kind = ("down", 0)
            elif f.throttle_next > 0:
                f.throttle_next -= 1
                kind = ("429", 429)
            elif f.fail_next > 0:
                f.fail_next -= 1
                kind = ("5xx", f.fail_status)
            elif f.throttle_rate and self._random.random() < f.throttle_rate:
                kind = ("429", 429)
            elif f.fail_rate and self._random.random() < f.fail_rate:
                kind = ("5xx", f.fail_status)
            else:
                return None
            self.injected[kind[0]] += 1
            return kind

    def _acquire(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or not body.get("username"):
            return 400, _error(400, "username and password are required")
        source_ok = self.auth_source is None or body.get("authSource") == self.auth_source
        if body.get("username") != self.username or body.get("password") != self._password \
                or not source_ok:
            return 401, _error(401, "Invalid username or password")
        token = f"{uuid.uuid4()}::{uuid.uuid4()}"
        with self._lock:
            expires = time.time() + self.faults.token_ttl
            self._tokens[token] = expires
        return 200, {"token": token, "validity": int(expires * 1000),
                     "expiresAt": _expires_at(expires), "roles": []}

    def _authorized(self, header: str | None) -> str | None:
        match = _AUTH_HEADER.match(header or "")
        if not match:
            return None
        token = match.group("token")
        with self._lock:
            expires = self._tokens.get(token)
            if expires is None or expires <= time.time():
                return None
        return token

    def _release(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def _query(self, params: dict[str, list[str]]) -> dict[str, Any]:
        names = [n.lower() for n in params.get("name", [])]
        with self._lock:
            found = [h.to_json() for h in self._hosts.values()
                     if not names or any(n in h.name.lower() for n in names)]
        return {"pageInfo": {"totalCount": len(found), "page": 0, "pageSize": 1000},
                "links": [], "resourceList": found}

    def _maintain(self, resource_id: str, method: str) -> bool:
        with self._lock:
            host = self._hosts.get(resource_id)
            if host is None:
                return False
            before = host.state
            host.state = MAINTAINED if method == "PUT" else STARTED
            self.history.append(Change(time.time(), resource_id, host.name, method, before,
                                       host.state))
        return True


def _expires_at(epoch: float) -> str:
    """vROps' human-readable expiry: ``Thursday, May 6, 2021 4:20:05 PM UTC``."""
    when = datetime.fromtimestamp(epoch, UTC)
    hour = when.hour % 12 or 12
    return f"{when:%A, %B} {when.day}, {when.year} {hour}:{when:%M:%S %p} UTC"


def _error(status: int, message: str) -> dict[str, Any]:
    """The body vROps sends with an error status."""
    return {"message": message, "httpStatusCode": status, "apiErrorCode": status}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeVrops

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its timeout) is normal here, not worth a traceback on stderr.
        logger.debug("fake vROps: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeVrops/1.0"
    protocol_version = "HTTP/1.1"

    @property
    def fake(self) -> FakeVrops:
        return self.server.fake  # type: ignore[attr-defined]  (a _Server)

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return _MALFORMED

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, params = parts.path.rstrip("/"), parse_qs(parts.query)
        body = self._body()
        if path.startswith("/_fake/"):
            self._admin(method, path, body)
            return
        endpoint = self._endpoint(method, path)
        self.fake._count(endpoint)
        fault = self.fake._fault()
        latency = self.fake.faults.latency
        if latency:
            time.sleep(latency)
        if fault is not None:
            kind, status = fault
            if kind == "down":
                self.close_connection = True  # no answer at all: the client sees a reset
                return
            headers = {"Retry-After": str(self.fake.faults.retry_after)} if kind == "429" else {}
            self._send(status, _error(status, f"injected {kind}"), headers)
            return
        if body is _MALFORMED:
            self._send(400, _error(400, "malformed JSON body"))
            return
        if endpoint == TOKEN_ACQUIRE:
            self._send(*self.fake._acquire(body))
            return
        if endpoint == UNKNOWN:
            self._send(404, _error(404, f"no such endpoint: {method} {path}"))
            return
        token = self.fake._authorized(self.headers.get("Authorization"))
        if token is None:
            self._send(401, _error(401, "Authentication is required: missing, invalid or "
                                        "expired token"))
            return
        if endpoint == TOKEN_RELEASE:
            self.fake._release(token)
            self._send(200)
        elif endpoint == RESOURCE_QUERY:
            self._send(200, self.fake._query(params))
        else:
            resource_id = _MAINTAINED_PATH.match(path).group("id")  # type: ignore[union-attr]
            if self.fake._maintain(resource_id, method):
                self._send(200)
            else:
                self._send(404, _error(404, f"No such resource - identifier: {resource_id}"))

    @staticmethod
    def _endpoint(method: str, path: str) -> str:
        if method == "POST" and path == "/suite-api/api/auth/token/acquire":
            return TOKEN_ACQUIRE
        if method == "POST" and path == "/suite-api/api/auth/token/release":
            return TOKEN_RELEASE
        if method == "GET" and path == _HOSTS_PATH:
            return RESOURCE_QUERY
        if method in ("PUT", "DELETE") and _MAINTAINED_PATH.match(path):
            return MAINTAINED_PUT if method == "PUT" else MAINTAINED_DELETE
        return UNKNOWN

    def _admin(self, method: str, path: str, body: Any) -> None:
        try:
            if method == "GET" and path == "/_fake/state":
                self._send(200, self.fake.snapshot())
            elif method == "POST" and path == "/_fake/config" and isinstance(body, dict):
                self.fake.configure(**body)
                self._send(200, vars(self.fake.faults))
            elif method == "POST" and path == "/_fake/hosts" and isinstance(body, dict):
                identifier = self.fake.add_host(body["name"], body["moref"], body["vcUuid"])
                self._send(200, {"identifier": identifier})
            elif method == "POST" and path == "/_fake/reset-calls":
                self.fake.reset_calls()
                self._send(200, {})
            else:
                self._send(404, _error(404, f"no such admin endpoint: {method} {path}"))
        except (KeyError, TypeError, ValueError) as exc:
            self._send(400, _error(400, f"bad admin request: {exc}"))


def parse_host(text: str) -> tuple[str, str, str]:
    """``esx01=host-19@<vc uuid>`` → ``("esx01", "host-19", "<vc uuid>")``."""
    match = re.fullmatch(r"(?P<name>[^=]+)=(?P<moref>[^@]+)@(?P<vc>.+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected NAME=MOREF@VCENTER_UUID, got {text!r}")
    return match.group("name"), match.group("moref"), match.group("vc")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake until interrupted (``python -m vebaq.devtools.fake_vrops --help``)."""
    parser = argparse.ArgumentParser(prog="python -m vebaq.devtools.fake_vrops",
                                     description="A fake vROps suite-api for demos and tests.")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--host", dest="hosts", action="append", type=parse_host, default=[],
                        metavar="NAME=MOREF@VCUUID", help="a HostSystem resource (repeatable)")
    parser.add_argument("--user", default=DEFAULT_USERNAME)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--auth-source", default=None)
    parser.add_argument("--token-ttl", type=float, default=DEFAULT_TOKEN_TTL, metavar="SECONDS")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="probability of a 503")
    parser.add_argument("--throttle-rate", type=float, default=0.0, help="probability of a 429")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fake = FakeVrops(args.hosts, username=args.user, password=args.password,
                     auth_source=args.auth_source, token_ttl=args.token_ttl, seed=args.seed,
                     host=args.bind, port=args.port, latency=args.latency,
                     fail_rate=args.fail_rate, throttle_rate=args.throttle_rate)
    fake.start()
    print(f"fake vROps at {fake.url} ({len(args.hosts)} host(s)); state: {fake.url}/_fake/state",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
