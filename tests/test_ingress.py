"""``vebaq ingress``: CloudEvents POSTed in binary, structured and batch mode become tasks.

First the ingress server in this process, over real HTTP and a real Redis: the three modes, task
names and ids, credentials, every refusal with its status and reason, all-or-nothing batches,
Redis down (503, nothing half-written, a resend converges), an id reused by another source.
Then real processes: ``vebaq ingress`` and an echo worker (task names in the worker's log, a
duplicate id run once), and the load test: 1,000 events through the ingress, an HTTP pool of 3
workers and a CloudEvents receiver, printing sent/delivered/lost/duplicates.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from producer.ingress import BATCH, STRUCTURED, Ingress, IngressServer, Refused, parse, serve
from tests.cloudevent_receiver import Receiver
from tests.support import Proc, start_worker, vebaq_argv, wait_until
from vebaq.core import config, keys
from vebaq.core.envelope import from_structured, to_structured
from vebaq.core.errors import ConfigError
from vebaq.devtools.embedded import free_port

TOKEN = "ingress-t0ken-3b9e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def event(event_id: str | None = None, subject: str | None = "VmPoweredOffEvent",
          source: str = "https://ci.example.com/hooks", **extra: Any) -> dict[str, Any]:
    """A structured CloudEvent from another source."""
    body: dict[str, Any] = {"specversion": "1.0", "id": event_id or str(uuid.uuid4()),
                            "source": source, "type": "com.example.ci.build.finished",
                            "time": "2024-05-06T16:20:05Z", "datacontenttype": "application/json",
                            "data": {"build": 7, "result": "green"}, **extra}
    if subject:
        body["subject"] = subject
    return body


def binary(structured: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The binary-mode headers and body of ``structured`` (as a Knative sender makes them)."""
    headers = {f"ce-{k}": str(v) for k, v in structured.items()
               if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = structured.get("datacontenttype", "application/json")
    return headers, json.dumps(structured.get("data")).encode()


def queued(r: redis.Redis, queue: str = "echo") -> list[tuple[str, str, dict[str, Any]]]:
    """``(task name, task id, event)`` of each task waiting in ``queue``, oldest first."""
    found = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        message = json.loads(raw)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], message["headers"]["id"], kwargs["event"]))
    return found


def make_ingress(redis_url: str, **environ: str) -> Ingress:
    settings = config.load(environ={"VEBAQ_BROKER_URL": redis_url, "VEBAQ_INGRESS_TOKEN": TOKEN,
                                    **environ})
    return Ingress(settings)


@pytest.fixture
def ingress_url(redis_url: str) -> Iterator[str]:
    server = serve(make_ingress(redis_url), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    stop(server)


def stop(server: IngressServer) -> None:
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5, "idle kept-alive connections must not hold a stop"
    server.ingress.app.close()


def post(url: str, body: Any, content_type: str = STRUCTURED,
         headers: dict[str, str] | None = None) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, data=data, timeout=30,
                         headers={"Content-Type": content_type, **AUTH, **(headers or {})})


# --- the ingress in this process

def test_three_modes_become_tasks_named_by_subject(ingress_url: str,
                                                   redis_client: redis.Redis) -> None:
    one, two = event("ev-binary"), event("ev-structured", subject="UserLoginSessionEvent")
    batch = [event("ev-b1", subject="com.vmware.cl.CreateLibraryItemEvent"),
             event("ev-b2", subject=None),  # no subject: named after its type
             event("ev-b3", subject="EnteredMaintenanceModeEvent")]
    headers, body = binary(one)
    answer = requests.post(ingress_url, data=body, headers={**headers, **AUTH}, timeout=30)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": 1, "tasks": 1, "pools": {"echo": 1}, "unrouted": 0}
    assert post(ingress_url, two).status_code == 202
    answer = post(ingress_url, batch, BATCH)
    assert answer.status_code == 202
    assert answer.json()["pools"] == {"echo": 3, "vrops": 1}  # the default triggers
    tasks = queued(redis_client)
    assert [(name, task_id) for name, task_id, _ in tasks] == [
        ("VmPoweredOffEvent", "ev-binary:echo"), ("UserLoginSessionEvent", "ev-structured:echo"),
        ("com.vmware.cl.CreateLibraryItemEvent", "ev-b1:echo"),
        ("com.example.ci.build.finished", "ev-b2:echo"),
        ("EnteredMaintenanceModeEvent", "ev-b3:echo")]
    for sent, (_, _, got) in zip([one, two, *batch], tasks, strict=True):
        assert got == sent  # the structured event, unchanged
    assert [t[1] for t in queued(redis_client, "vrops")] == ["ev-b3:vrops"]


def test_credentials(redis_url: str, ingress_url: str) -> None:
    basic = "Basic " + base64.b64encode(b"x:" + TOKEN.encode()).decode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": basic}):
        answer = requests.post(ingress_url, data=json.dumps(event()), timeout=30,
                               headers={"Content-Type": STRUCTURED, **headers})
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="vebaq"'
        assert answer.text == "missing or wrong credentials\n"
    server = serve(make_ingress(redis_url, VEBAQ_INGRESS_TOKEN="", VEBAQ_INGRESS_USERNAME="hook",
                                VEBAQ_INGRESS_PASSWORD="pa:ss w0rd"), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        ok = requests.post(url, json=event(), auth=("hook", "pa:ss w0rd"), timeout=30,
                           headers={"Content-Type": STRUCTURED})
        bad = requests.post(url, json=event(), auth=("hook", "guess"), timeout=30,
                            headers={"Content-Type": STRUCTURED})
        assert (ok.status_code, bad.status_code) == (202, 401)
        assert bad.headers["WWW-Authenticate"] == 'Basic realm="vebaq"'
    finally:
        stop(server)


def test_no_credentials_no_ingress(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="ingress: no credentials: set ingress.token"):
        Ingress(config.load(environ={"VEBAQ_BROKER_URL": redis_url}))


@pytest.mark.parametrize(("body", "content_type", "headers", "reason"), [
    (b"{not json", STRUCTURED, {}, "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, STRUCTURED, {}, "nested too deeply"),
    (b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": '
     + b"[" * 100_000 + b"]" * 100_000 + b"}", STRUCTURED, {}, "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, BATCH, {}, "nested too deeply"),
    ([1, 2], STRUCTURED, {}, "expected a JSON object, got list"),
    ({k: v for k, v in event().items() if k != "id"}, STRUCTURED, {},
     "missing required attribute(s): id"),
    ({**event(), "specversion": "0.3"}, STRUCTURED, {}, "unsupported specversion '0.3'"),
    ({**event(), "time": "yesterday"}, STRUCTURED, {}, "time 'yesterday' is not an RFC 3339"),
    ({**event(), "Bad-Ext": "x"}, STRUCTURED, {}, "invalid CloudEvent"),
    ({**event(), "subject": "celery.backend_cleanup"}, STRUCTURED, {}, "are Celery's own"),
    ({**event(), "id": "x" * 2000}, STRUCTURED, {}, "id longer than 1024 characters"),
    ({"events": []}, BATCH, {}, "batch: expected a JSON array of events, got dict"),
    ([event(), {"specversion": "1.0"}], BATCH, {},
     "event [1]: missing required attribute(s): id, source, type"),
    (b'{"x": ', "application/json", {"ce-specversion": "1.0", "ce-id": "a", "ce-source": "/s",
                                      "ce-type": "t"}, "the body is not the JSON"),
    (b"", "application/json", {"ce-id": "a", "ce-source": "/s"},
     "binary mode: missing header(s) ce-specversion, ce-type"),
    (b"", "text/plain", {"ce-specversion": "1.0", "ce-id": "a", "ce-source": "/s",
                         "ce-type": "t", "ce-time": "noon"}, "ce-time 'noon' is not an RFC 3339"),
])
def test_malformed_events_are_400_with_a_reason(ingress_url: str, redis_client: redis.Redis,
                                                body: Any, content_type: str,
                                                headers: dict[str, str], reason: str) -> None:
    answer = post(ingress_url, body, content_type, headers)
    assert answer.status_code == 400, answer.text
    assert reason in answer.text and answer.text.count("\n") == 1
    assert len(answer.text) <= 302
    assert redis_client.llen("echo") == 0  # a batch is all or nothing


def test_wrong_content_type_size_or_path(ingress_url: str, redis_client: redis.Redis) -> None:
    assert post(ingress_url, event(), "application/json").status_code == 415
    xml = post(ingress_url, b"<event/>", "application/cloudevents+xml")
    assert xml.status_code == 415 and "only the JSON event format" in xml.text
    big = post(ingress_url, b" " * (1024 * 1024 + 1))
    assert big.status_code == 413 and "larger than the limit of 1048576" in big.text
    assert big.headers["Connection"] == "close"
    chunked = requests.post(ingress_url, data=iter([json.dumps(event()).encode()]), timeout=30,
                            headers={"Content-Type": STRUCTURED, **AUTH})
    assert chunked.status_code == 411
    assert post(ingress_url + "elsewhere", event()).status_code == 404
    assert redis_client.llen("echo") == 0


def test_an_id_another_source_used_is_refused(ingress_url: str,
                                              redis_client: redis.Redis) -> None:
    """Workers take equal ids for duplicates: a second source's event "1" would vanish."""
    assert post(ingress_url, event("1", source="/jenkins")).status_code == 202
    assert post(ingress_url, event("1", source="/jenkins")).status_code == 202  # a resend
    other = post(ingress_url, event("1", source="/github"))
    assert other.status_code == 409
    assert "already used by source '/jenkins'" in other.text
    both = post(ingress_url, [event("2", source="/a"), event("2", source="/b")], BATCH)
    assert both.status_code == 409 and "used by two sources in this request" in both.text
    assert redis_client.get(keys.ingress_event_source("1")) == b"/jenkins"
    assert redis_client.ttl(keys.ingress_event_source("1")) > 6 * 24 * 3600
    assert len(queued(redis_client)) == 2


def test_events_no_trigger_matches_are_accepted_and_counted(redis_url: str, tmp_path: Path,
                                                            redis_client: redis.Redis) -> None:
    path = tmp_path / "vebaq.yaml"
    path.write_text("triggers: [{pool: echo, filters: [{exact: {type: com.vmware.x}}]}]\n")
    settings = config.load(path, environ={"VEBAQ_BROKER_URL": redis_url,
                                          "VEBAQ_INGRESS_TOKEN": TOKEN})
    server = serve(Ingress(settings), "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        answer = post(base + "/", [event(), event(type="com.vmware.x")], BATCH)
        assert answer.json() == {"accepted": 2, "tasks": 1, "pools": {"echo": 1}, "unrouted": 1}
        metrics = requests.get(base + "/metrics", timeout=10).text
        assert "vebaq_ingress_events_unrouted_total 1.0" in metrics
        assert 'vebaq_ingress_requests_total{status="202"} 1.0' in metrics
        assert requests.get(base + "/healthz", timeout=10).text == "ok\n"
    finally:
        stop(server)
    assert redis_client.llen("echo") == 1


def test_stop_does_not_wait_for_idle_kept_alive_connections(redis_url: str) -> None:
    server = serve(make_ingress(redis_url), "127.0.0.1", 0)
    session = requests.Session()  # keeps its connection open, as Knative's senders do
    answer = session.post(f"http://127.0.0.1:{server.server_address[1]}/", json=event(),
                          headers={"Content-Type": STRUCTURED, **AUTH}, timeout=30)
    assert answer.status_code == 202 and answer.headers.get("Connection") != "close"
    stop(server)  # asserts it took less than 5 s (an idle connection waits 30 s for a request)
    session.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A redis-server (append-only, fsync always) the test can kill and start again."""
    binary_path = shutil.which("redis-server")
    if binary_path is None:
        pytest.fail("this test stops a Redis server: it needs redis-server on PATH",
                    pytrace=False)
    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()
    argv = [binary_path, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    url = f"redis://127.0.0.1:{port}/0"
    procs: list[subprocess.Popen] = []

    def start() -> None:
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        wait_until(lambda: pings(url), 20, "redis-server")

    def kill() -> None:
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(10)

    start()
    yield url, kill, start
    procs[-1].terminate()
    procs[-1].wait(10)


def pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_redis_down_is_503_and_nothing_half_written(own_redis) -> None:
    url, kill, start = own_redis
    server = serve(make_ingress(url), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert post(base + "/", event("before")).status_code == 202
        kill()
        batch = [event(f"during-{i}") for i in range(50)]
        answer = post(base + "/", batch, BATCH)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert "Redis is unavailable: the events were not accepted" in answer.text
        assert requests.get(base + "/healthz", timeout=30).status_code == 503
        start()  # from its append-only file: what Redis took before it died
        r = redis.Redis.from_url(url)
        assert [t[1] for t in queued(r)] == ["before:echo"]  # nothing of the failed batch
        assert post(base + "/", batch, BATCH).status_code == 202  # the sender's resend
        ids = [t[1] for t in queued(r)]
        assert ids == ["before:echo", *(f"during-{i}:echo" for i in range(50))]
        print(f"\n[ingress, Redis down] sent={len(batch) + 1} refused with 503 while down=50 "
              f"enqueued={len(ids)} lost=0 duplicates={len(ids) - len(set(ids))}")
    finally:
        stop(server)


def test_a_batch_is_one_redis_transaction(own_redis) -> None:
    url, _, _ = own_redis
    r = redis.Redis.from_url(url)
    server = serve(make_ingress(url), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert post(url, event("first")).status_code == 202  # declares the queues (EXECs)
        before = r.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
        answer = post(url, [event(f"tx-{i}") for i in range(200)], BATCH)
        assert answer.status_code == 202
        after = r.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
    finally:
        stop(server)
    assert after - before == 1  # one MULTI … EXEC for the 200 tasks
    assert r.llen("echo") == 201


# --- real processes

def process_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    env.update({"VEBAQ_BROKER_URL": redis_url, "VEBAQ_INGRESS_TOKEN": TOKEN,
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def start_ingress(env: dict[str, str], log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("ingress", vebaq_argv("ingress", "--bind", "127.0.0.1", "--port", str(port)),
                env, log_dir)
    proc.wait_for(r"ingress listening on", timeout=60)
    return proc, f"http://127.0.0.1:{port}/"


@pytest.mark.slow
def test_posted_events_come_out_of_the_echo_pool(redis_url: str, log_dir: Path) -> None:
    env = process_env(redis_url)
    ingress, url = start_ingress(env, log_dir)
    worker = start_worker("echo", env, log_dir, concurrency=2)
    one = event("kn-1")
    headers, body = binary(one)
    assert requests.post(url, data=body, headers={**headers, **AUTH}, timeout=30).status_code \
        == 202
    assert post(url, event("kn-2", subject="UserLoginSessionEvent")).status_code == 202
    assert post(url, [event("kn-3", subject="HostConnectionLostEvent"),
                      event("kn-4", subject=None)], BATCH).status_code == 202
    for name, event_id in (("VmPoweredOffEvent", "kn-1"), ("UserLoginSessionEvent", "kn-2"),
                           ("HostConnectionLostEvent", "kn-3"),
                           ("com.example.ci.build.finished", "kn-4")):
        worker.wait_for(rf"Task {name}\[{event_id}:echo\] succeeded", timeout=60)

    # The sender posts kn-1 again (a webhook retry): the function does not run again.
    assert requests.post(url, data=body, headers={**headers, **AUTH}, timeout=30).status_code \
        == 202
    worker.wait_for(r"kn-1: already handled by echo \(duplicate delivery suppressed\)", 60)
    assert worker.log().count("  id: kn-1\n") == 1
    assert "  data:\n    {\n      \"build\": 7," in worker.log()
    ingress.stop(), worker.stop()
    assert "accepted 2 event(s) (batch) from 127.0.0.1" in ingress.log()
    assert TOKEN not in ingress.log() + worker.log()


#: The load test's size, and how many sender threads post at once.
LOAD_EVENTS = 1000
LOAD_SENDERS = 8
LOAD_WORKERS = 3


def post_load(url: str, events: list[dict[str, Any]], senders: int) -> list[int]:
    """Post ``events``: every other one alone in binary mode, the rest in batches of 10."""
    singles, batched = events[::2], events[1::2]
    requests_ = [("binary", [e]) for e in singles] + \
        [("batch", batched[i:i + 10]) for i in range(0, len(batched), 10)]
    session = requests.Session()

    def send(request: tuple[str, list[dict[str, Any]]]) -> int:
        mode, chunk = request
        if mode == "binary":
            headers, body = binary(chunk[0])
            return session.post(url, data=body, headers={**headers, **AUTH}, timeout=60).status_code
        return post(url, chunk, BATCH).status_code

    with ThreadPoolExecutor(senders) as pool:
        return list(pool.map(send, requests_))


@pytest.mark.slow
def test_load_through_ingress_http_pool_and_receiver(redis_url: str, tmp_path: Path,
                                                     log_dir: Path) -> None:
    with Receiver(record=False) as receiver:
        path = tmp_path / "vebaq.yaml"
        path.write_text(f"""
triggers: [{{pool: fn}}]
pools: {{fn: {{sink: {{url: "{receiver.url}/", concurrency: 8}}}}}}
""")
        env = process_env(redis_url, VEBAQ_CONFIG=str(path))
        ingress, url = start_ingress(env, log_dir)
        workers = [start_worker("fn", env, log_dir, concurrency=8, name=f"worker-fn-{i}",
                                extra=("-n", f"fn{i}@%h")) for i in range(LOAD_WORKERS)]
        events = [event(str(uuid.uuid4()), subject=f"LoadEvent{i % 7}") for i in
                  range(LOAD_EVENTS)]
        started = time.monotonic()
        statuses = post_load(url, events, LOAD_SENDERS)
        assert set(statuses) == {202}
        sent = {e["id"] for e in events}
        wait_until(lambda: set(receiver.accepted) >= sent, 180, f"{LOAD_EVENTS} deliveries")
        seconds = time.monotonic() - started
        time.sleep(1)  # anything sent twice would arrive now
        for proc in (ingress, *workers):
            proc.stop()
        delivered = set(receiver.accepted) & sent
        lost = len(sent - delivered)
        duplicates = sum(receiver.attempts.values()) - len(receiver.attempts)
        print(f"\n[load: ingress → HTTP pool ({LOAD_WORKERS} workers) → receiver] "
              f"sent={len(sent)} delivered={len(delivered)} lost={lost} "
              f"duplicates={duplicates} in {seconds:.1f}s ({len(sent) / seconds:.0f} events/s)")
        assert lost == 0 and duplicates == 0
        assert set(receiver.attempts) == sent


# --- any request: events, or one refusal with a one-line reason

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                      children, max_size=5),
    max_leaves=12)
attribute_names = st.sampled_from(["specversion", "id", "source", "type", "subject", "time",
                                   "datacontenttype", "data", "data_base64", "dataschema",
                                   "Bad-Ext", "ext1"])
structured_events = st.dictionaries(attribute_names, json_values | st.just("1.0"), max_size=9)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@st.composite
def requests_(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    kind = draw(st.sampled_from(["structured", "batch", "binary", "other"]))
    if kind == "structured":
        body = draw(st.one_of(structured_events.map(json.dumps), st.text(max_size=40)))
        return {"content-type": STRUCTURED}, body.encode()
    if kind == "batch":
        body = draw(st.one_of(st.lists(structured_events, max_size=3).map(json.dumps),
                              json_values.map(json.dumps)))
        return {"content-type": BATCH}, body.encode()
    headers = {f"ce-{name.lower()}": draw(header_values)
               for name in draw(st.lists(attribute_names, max_size=7))}
    if draw(st.booleans()):
        headers["ce-specversion"] = "1.0"
    headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain",
                                                    "application/octet-stream", "", "x/y"]))
    return headers, draw(st.binary(max_size=40))


@hypothesis_settings(max_examples=400, deadline=None)
@given(request=requests_())
def test_any_request_is_events_or_one_clear_refusal(request: tuple[dict[str, str], bytes]) -> None:
    headers, body = request
    try:
        _, parsed = parse(headers, body)
    except Refused as refused:
        assert refused.status in (400, 415)
        assert refused.reason and "\n" not in refused.reason and len(refused.reason) <= 300
        return
    for item in parsed:  # what the workers will parse again
        assert item.get_specversion() == "1.0" and item.get_id() and item.get_source()
        from_structured(to_structured(item))
