"""HTTP pools (``pools.<pool>.sink``) against a real CloudEvents receiver over real HTTP.

The receiver (:mod:`tests.cloudevent_receiver`) is made of the CloudEvents SDK and the standard
library only, like an existing Knative function. First the sink function in this process (every
answer, TLS, the concurrency limit, secrets, replies), then real worker processes: every event
in binary and structured mode; a 500 then 200, a 429 with ``Retry-After``, a hang; a 400 that
is dead-lettered with its status and replayed with ``vebaq dlq replay``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cloudevent_receiver import Answer, Receiver
from tests.support import ROOT, start_worker, vebaq_argv, wait_until
from vebaq.core import config, deadletters
from vebaq.core.broker import sender_app
from vebaq.core.config import SinkSettings
from vebaq.core.envelope import from_structured
from vebaq.core.messages import TaskMessage, queue_for
from vebaq.core.publish import Publisher
from vebaq.core.secrets import Secret
from vebaq.devtools.embedded import free_port
from workers.errors import PermanentError
from workers.sinks import SINK_FUNCTION, HttpSink, ReplyPublisher, SinkRejected, SinkUnavailable

TOKEN = "sink-t0ken-8f2c91d4"
API_KEY = "api-k3y-from-env-77a1"


def vcenter_event(event_id: str, subject: str = "VmPoweredOffEvent", key: int = 1,
                  **extra: Any) -> dict[str, Any]:
    """A structured event as the producer makes it (router type, PascalCase data)."""
    return {
        "specversion": "1.0", "id": event_id, "source": "https://vc01.example.com/sdk",
        "type": "com.vmware.event.router/event", "subject": subject,
        "time": "2021-05-06T16:20:05.137999Z", "datacontenttype": "application/json",
        "eventclass": "event", "vsphereapiversion": "8.0.2.0",
        "vcenteruuid": "5f0c7a3e-0000-4000-8000-000000000001",
        "data": {"Key": key, "CreatedTime": "2021-05-06T16:20:05.137999Z",
                 "UserName": "VSPHERE.LOCAL\\Administrator",
                 "Vm": {"Name": f"vm-{key}", "Vm": {"Type": "VirtualMachine", "Value": "vm-42"}},
                 "FullFormattedMessage": f"vm-{key} on esx01 is powered off"},
        **extra,
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(token=TOKEN) as server:
        yield server


def sink_for(receiver: Receiver, path: str = "/", **overrides: Any) -> HttpSink:
    values: dict[str, Any] = {"url": receiver.url + path, "token": Secret(TOKEN), "timeout": 2.0}
    values.update(overrides)
    return HttpSink("fn", SinkSettings(**values))


# --- the sink function, in this process

@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_receiver_reads_the_event_as_sent(receiver: Receiver, mode: str) -> None:
    sent = vcenter_event("ev-1")
    assert sink_for(receiver, f"/{mode}", mode=mode)(from_structured(sent)) == 200
    (delivery,) = receiver.deliveries
    assert delivery.mode == mode and delivery.path == f"/{mode}"
    expected = {k: v for k, v in sent.items() if k != "data"}
    assert delivery.attributes == expected  # extensions included
    assert delivery.data == sent["data"]
    if mode == "binary":
        assert delivery.headers["ce-id"] == "ev-1" and delivery.headers["ce-vcenteruuid"]
        assert delivery.headers["content-type"] == "application/json"
        assert json.loads(delivery.body) == sent["data"]
    else:
        assert delivery.headers["content-type"] == "application/cloudevents+json"
        assert not any(name.startswith("ce-") for name in delivery.headers)
        assert json.loads(delivery.body) == sent


def test_non_json_and_binary_data(receiver: Receiver) -> None:
    sink = sink_for(receiver)
    text = from_structured({"specversion": "1.0", "id": "t", "source": "/s", "type": "x",
                            "datacontenttype": "text/plain", "data": "héllo"})
    raw = from_structured({"specversion": "1.0", "id": "b", "source": "/s", "type": "x",
                           "datacontenttype": "application/octet-stream",
                           "data_base64": "AAEC/w=="})
    sink(text), sink(raw)
    assert receiver.of("t")[0].body == "héllo".encode()
    assert receiver.of("t")[0].headers["content-type"] == "text/plain"
    assert receiver.of("b")[0].body == b"\x00\x01\x02\xff"


@pytest.mark.parametrize(("answer", "kind", "retry_after"), [
    (Answer(500, "boom"), SinkUnavailable, None),
    (Answer(503, "busy", headers=(("Retry-After", "7"),)), SinkUnavailable, 7.0),
    (Answer(429, "slow down", headers=(("Retry-After", "3"),)), SinkUnavailable, 3.0),
    (Answer(408), SinkUnavailable, None),
    (Answer(400, "bad event"), SinkRejected, None),
    (Answer(404), SinkRejected, None),
    (Answer(410, "gone"), SinkRejected, None),
    (Answer(302, headers=(("Location", "http://elsewhere/"),)), SinkRejected, None),
])
def test_every_answer_is_a_retry_or_a_dead_letter(receiver: Receiver, answer: Answer,
                                                   kind: type, retry_after: float | None) -> None:
    receiver.default = answer
    with pytest.raises(kind) as caught:
        sink_for(receiver)(from_structured(vcenter_event("ev-x")))
    error = caught.value
    assert isinstance(error, PermanentError) == (kind is SinkRejected)
    assert error.status == answer.status and error.retry_after == retry_after
    attributes = deadletters.knative_attributes(error)
    assert attributes["knativeerrorcode"] == str(answer.status)
    assert attributes["knativeerrordest"] == receiver.url + "/"
    assert attributes.get("knativeerrordata", "") == answer.body
    assert "\n" not in str(error)
    if answer.status == 302:
        assert "not followed" in str(error)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_delivered(receiver: Receiver, status: int) -> None:
    receiver.default = Answer(status)
    assert sink_for(receiver)(from_structured(vcenter_event("ok"))) == status


def test_no_answer_is_retried(receiver: Receiver) -> None:
    receiver.default = Answer(200, delay=2)
    with pytest.raises(SinkUnavailable, match=r"no answer within 0\.5s \(timeout\)") as caught:
        sink_for(receiver, timeout=0.5)(from_structured(vcenter_event("slow")))
    assert caught.value.status is None
    assert deadletters.knative_attributes(caught.value) == {
        "knativeerrordest": receiver.url + "/"}  # no code, no data: there was no answer
    with pytest.raises(SinkUnavailable, match="ConnectionError"):
        HttpSink("fn", SinkSettings(url=f"http://127.0.0.1:{free_port()}/"))(
            from_structured(vcenter_event("refused")))


def test_error_bodies_are_bounded_and_scrubbed(receiver: Receiver) -> None:
    """A server that echoes the request's Authorization in its error page leaks nothing."""
    receiver.default = Answer(400, "rejected request with {authorization} " + "x" * 5000)
    sink = HttpSink("fn", SinkSettings(url=receiver.url + "/", token=Secret(TOKEN),
                                       headers=(("X-Api-Key", Secret(API_KEY)),)))
    with pytest.raises(SinkRejected) as caught:
        sink(from_structured(vcenter_event("leak")))
    assert receiver.of("leak")[0].headers["x-api-key"] == API_KEY  # it was sent…
    record = json.dumps(deadletters.knative_attributes(caught.value)) + str(caught.value) + \
        repr(sink) + repr(sink.sink)
    assert TOKEN not in record and API_KEY not in record  # … and is nowhere else
    assert "Bearer ***" in caught.value.body
    assert len(caught.value.body) <= 1024 and len(str(caught.value)) < 400


def test_basic_auth_and_wrong_token(receiver: Receiver) -> None:
    with pytest.raises(SinkRejected, match="401"):
        sink_for(receiver, token=Secret("wrong"))(from_structured(vcenter_event("a")))
    receiver.token = None
    sink_for(receiver, token=Secret(""), username="fn", password=Secret("pw-basic"))(
        from_structured(vcenter_event("b")))
    assert receiver.of("b")[0].headers["authorization"].startswith("Basic ")


def test_tls_is_verified_unless_told_otherwise(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    event = from_structured(vcenter_event("tls"))
    with Receiver(tls=(str(cert), str(key))) as server:
        assert server.url.startswith("https://")
        with pytest.raises(SinkRejected, match="TLS verification failed"):
            HttpSink("fn", SinkSettings(url=server.url))(event)
        assert HttpSink("fn", SinkSettings(url=server.url, ca_bundle=str(cert)))(event) == 200
        assert HttpSink("fn", SinkSettings(url=server.url, insecure_ssl=True))(event) == 200


def test_concurrency_is_limited_per_process(receiver: Receiver) -> None:
    receiver.default = Answer(200, delay=0.3)
    sink = sink_for(receiver, concurrency=2, timeout=5)
    threads = [threading.Thread(target=sink, args=(from_structured(vcenter_event(f"c{i}")),))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(receiver.accepted.values()) == 6 and receiver.max_in_flight == 2


def test_replies_are_ignored_or_enqueued(receiver: Receiver, redis_url: str,
                                         redis_client: redis.Redis,
                                         caplog: pytest.LogCaptureFixture) -> None:
    reply = ({"specversion": "1.0", "id": "reply-1", "source": "/kn-fn", "type": "com.example.done",
              "subject": "TicketOpened"}, {"ticket": 42})
    receiver.default = Answer(200, reply=reply)
    caplog.set_level(logging.INFO, logger="vebaq.sink")
    sink_for(receiver)(from_structured(vcenter_event("asks")))
    assert "replied with event reply-1 (com.example.done); ignored" in caplog.text
    assert redis_client.llen("echo") == 0

    settings = config.load(environ={"VEBAQ_BROKER_URL": redis_url})  # default: echo gets all
    replies = ReplyPublisher(settings)
    HttpSink("fn", SinkSettings(url=receiver.url, token=Secret(TOKEN)), replies)(
        from_structured(vcenter_event("asks-again")))
    (raw,) = redis_client.lrange("echo", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "TicketOpened"
    assert message["headers"]["id"] == "reply-1:echo"
    assert "reply event reply-1 (com.example.done) enqueued to echo" in caplog.text

    receiver.default = Answer(200, "not an event", headers=(("ce-id", "x"),))
    sink_for(receiver)(from_structured(vcenter_event("bad-reply")))  # delivered all the same
    assert "replied with an invalid CloudEvent" in caplog.text


# --- real worker processes

def worker_env(redis_url: str, config_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    env.update({"VEBAQ_BROKER_URL": redis_url, "VEBAQ_CONFIG": str(config_path),
                "PYTHONUNBUFFERED": "1", "SINK_TOKEN": TOKEN, **extra})
    return env


def publish(redis_url: str, events: list[dict[str, Any]], pools: list[str]) -> None:
    app = sender_app(config.load(environ={"VEBAQ_BROKER_URL": redis_url}), "test-sender")
    try:
        Publisher(app).publish([TaskMessage(e["subject"], e, pool)
                                for e in events for pool in pools])
    finally:
        app.close()


@pytest.mark.slow
def test_a_worker_delivers_every_event_in_both_modes(receiver: Receiver, redis_url: str,
                                                     tmp_path: Path, log_dir: Path) -> None:
    path = tmp_path / "vebaq.yaml"
    path.write_text(f"""
triggers: [{{pool: kn-binary}}, {{pool: kn-structured}}]
pools:
  kn-binary: {{sink: {{url: "{receiver.url}/binary", token: {{env: SINK_TOKEN}}}}}}
  kn-structured:
    sink: {{url: "{receiver.url}/structured", mode: structured, token: {{env: SINK_TOKEN}}}}
""")
    worker = start_worker("kn-binary", worker_env(redis_url, path), log_dir, concurrency=4,
                          extra=("--pool", "kn-structured"))
    subjects = ("VmPoweredOffEvent", "UserLoginSessionEvent",
                "com.vmware.cl.CreateLibraryItemEvent")
    events = [vcenter_event(f"ev-{i}", key=i, subject=subjects[i % 3]) for i in range(30)]
    publish(redis_url, events, ["kn-binary", "kn-structured"])
    wait_until(lambda: len(receiver.deliveries) >= 60, 60, "60 deliveries")
    time.sleep(0.5)
    worker.stop()
    for mode in ("binary", "structured"):
        got = {d.event_id: d for d in receiver.deliveries if d.path == f"/{mode}"}
        assert len(got) == 30 and all(d.mode == mode for d in got.values())
        for event in events:
            delivery = got[event["id"]]
            assert delivery.attributes == {k: v for k, v in event.items() if k != "data"}
            assert delivery.data == event["data"]
    sent = Counter((d.path, d.event_id) for d in receiver.deliveries)
    assert set(sent.values()) == {1}, "no event was sent twice to one sink"
    log = worker.log()
    assert "Task com.vmware.cl.CreateLibraryItemEvent[ev-2:kn-binary] succeeded" in log
    assert TOKEN not in log


@pytest.mark.slow
def test_retries_timeouts_dead_letters_and_replay(receiver: Receiver, redis_url: str,
                                                  redis_client: redis.Redis, tmp_path: Path,
                                                  log_dir: Path) -> None:
    path = tmp_path / "vebaq.yaml"
    path.write_text(f"""
triggers: [{{pool: fn}}]
pools:
  fn:
    retry: 4
    backoffDelay: 200ms
    maxDelay: 1s
    jitter: false
    sink: {{url: "{receiver.url}/fn", timeout: 1s, token: {{env: SINK_TOKEN}}}}
""")
    receiver.plan = {
        "e-500": [Answer(500, "try later")],
        "e-429": [Answer(429, headers=(("Retry-After", "2"),))],
        "e-hang": [Answer(200, delay=4)],
        "e-400": [Answer(400, "invalid request {authorization}")],
    }
    env = worker_env(redis_url, path)
    worker = start_worker("fn", env, log_dir, concurrency=4)
    publish(redis_url, [vcenter_event(i, key=n) for n, i in enumerate(receiver.plan)], ["fn"])

    wait_until(lambda: all(receiver.accepted[i] >= 1 for i in ("e-500", "e-429", "e-hang")),
               60, "the retried events to be delivered")
    letter = wait_until(lambda: deadletters.list_letters(redis_client), 30, "the dead letter")[0]
    assert receiver.attempts["e-500"] == 2 and receiver.attempts["e-429"] == 2
    assert receiver.attempts["e-hang"] == 2  # the hung attempt timed out and was retried
    first, second = receiver.of("e-429")
    assert second.received_at - first.received_at >= 1.9, "Retry-After: 2 was honoured"
    assert receiver.attempts["e-400"] == 1  # a 400 is not retried
    assert (letter["event"]["id"], letter["pool"], letter["function"], letter["attempts"]) == \
        ("e-400", "fn", SINK_FUNCTION, 1)
    assert letter["knativeerrorcode"] == "400"
    assert letter["knativeerrordest"] == f"{receiver.url}/fn"
    assert letter["knativeerrordata"] == "invalid request Bearer ***"
    assert letter["exception"] == "SinkRejected"
    log = worker.log()
    assert "no answer within 1s (timeout)" in log and "answered 500" in log
    assert TOKEN not in log and TOKEN not in json.dumps(letter)

    # The function is fixed: replay the dead letter from the command line.
    replay = subprocess.run(vebaq_argv("dlq", "replay", letter["id"]), env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    assert f"replayed 1 dead letter ({letter['id']})" in replay.stdout
    wait_until(lambda: receiver.accepted["e-400"] == 1, 30, "the replayed event delivered")
    assert deadletters.depth(redis_client) == 0
    assert redis_client.llen(queue_for("fn").name) == 0
    worker.stop()
    print(f"\n[http pool] attempts: {dict(receiver.attempts)}; delivered: "
          f"{dict(receiver.accepted)}; dead-lettered then replayed: e-400")


def test_worker_command_defaults_to_threads_for_http_pools(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vebaq.cli import cli
    from workers.celery import app
    from workers.pools import POOLS
    from workers.settings import settings

    path = tmp_path / "vebaq.yaml"
    path.write_text("pools: {fn: {sink: {url: 'http://127.0.0.1:9/', concurrency: 12}}}\n")
    monkeypatch.setenv("VEBAQ_CONFIG", str(path))
    settings.cache_clear()
    calls: list[list[str]] = []
    monkeypatch.setattr(app, "worker_main", calls.append)
    try:
        result = CliRunner().invoke(cli, ["worker", "--pool", "fn"], catch_exceptions=False)
    finally:
        POOLS.pop("fn", None)
    assert result.exit_code == 0, result.output
    argv = calls.pop()
    assert argv[argv.index("-P") + 1] == "threads" and argv[argv.index("-c") + 1] == "12"
