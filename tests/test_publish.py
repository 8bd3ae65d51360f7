"""The publisher's own Redis path against Celery's: the same messages, field by field; order
across pipelines; an atomic batch all or nothing when the connection breaks; a real worker runs
what it sent; Celery's event receiver and a real Flower see each task-sent event with its queue.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, signals

from tests.support import CuttableProxy, Proc, free_port, start_worker, wait_until
from vebaq.core import config
from vebaq.core.broker import sender_app
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import PIPELINE_SIZE, Publisher, RedisWire

SOURCE = "https://vc.test.invalid/sdk"


def structured(key: int, subject: str = "VmPoweredOffEvent", **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"ev-{key}", "source": SOURCE,
            "type": "com.vmware.event.router/event", "subject": subject,
            "time": "2026-11-30T10:00:00.5Z", "datacontenttype": "application/json",
            "data": {"Key": key, "FullFormattedMessage": f"event {key} ✓ «ü»", **data}}


def variety() -> list[TaskMessage]:
    """Every kind of message senders make: a first delivery (one event for two pools), a retry,
    a replay of some functions, a forced replay."""
    shared = structured(1, Host={"Name": "esx01", "Host": {"Type": "HostSystem", "Value": "h-1"}})
    return [
        TaskMessage("VmPoweredOffEvent", shared, "echo"),
        TaskMessage("VmPoweredOffEvent", shared, "vrops"),
        TaskMessage("UserLoginSessionEvent", structured(2, "UserLoginSessionEvent"), "echo",
                    attempt=3, functions=("echo",), first_failed_at=1764496800.25),
        TaskMessage("com.example.Custom", structured(3, "com.example.Custom"), "echo",
                    functions=("echo",), id_suffix="replay-t0k3n"),
        TaskMessage("VmPoweredOffEvent", {**structured(4), "replayed": True}, "echo",
                    id_suffix="replay-f0rce", force="f0rce"),
    ]


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = sender_app(config.load(environ={"VEBAQ_BROKER_URL": redis_url}), "test-publish")
    yield app
    app.close()


class CeleryPath:
    """While active, a ``before_task_publish`` receiver is connected: the publisher must then
    send through Celery's ``send_task`` (tracing libraries add headers there)."""

    def __enter__(self) -> CeleryPath:
        signals.before_task_publish.connect(self.hook)
        return self

    def __exit__(self, *exc: object) -> None:
        signals.before_task_publish.disconnect(self.hook)

    @staticmethod
    def hook(**_: Any) -> None:
        pass


def decoded(raw: bytes) -> dict[str, Any]:
    envelope = json.loads(raw)
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    return envelope


def drain(r: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Messages in the order a worker takes them (kombu pops the list's tail)."""
    return [decoded(raw) for raw in reversed(r.lrange(queue, 0, -1))]


class SentEvents:
    """Every message PUBLISHed on the task-sent topic while active."""

    def __init__(self, r: redis.Redis) -> None:
        self.pubsub = r.pubsub()
        self.pubsub.psubscribe("*celeryev/task.sent")
        self.pubsub.get_message(timeout=5)  # the subscription's confirmation

    def take(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=1)
            if message and message["type"] == "pmessage":
                got.append((message["channel"].decode(), decoded(message["data"])))
        self.pubsub.close()
        return got


def without(envelope: dict[str, Any], *paths: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(envelope))
    for path in paths:
        *parents, last = path.split(".")
        node = copy
        for name in parents:
            node = node[name]
        node.pop(last, None)
    return copy


def test_the_own_path_writes_what_celery_writes(app: Celery, redis_client: redis.Redis) -> None:
    publisher = Publisher(app)
    messages = variety()
    with CeleryPath():
        events = SentEvents(redis_client)
        publisher.publish(messages)
        by_celery = {q: drain(redis_client, q) for q in ("echo", "vrops")}
        celery_events = events.take(len(messages))
    redis_client.delete("echo", "vrops")
    events = SentEvents(redis_client)
    publisher.publish(messages)
    ours = {q: drain(redis_client, q) for q in ("echo", "vrops")}
    our_events = events.take(len(messages))
    assert isinstance(publisher._wire, RedisWire)

    varying = ("properties.delivery_tag",)
    celery_only = ("properties.argsrepr", "properties.kwargsrepr")  # send_task's stray copies
    assert [len(v) for v in ours.values()] == [4, 1]
    for queue, expected in by_celery.items():
        for theirs, mine in zip(expected, ours[queue], strict=True):
            assert without(mine, *varying) == without(theirs, *varying, *celery_only)
            assert mine["body"][1]["event"]["data"]["FullFormattedMessage"].endswith("✓ «ü»")
    assert len(our_events) == len(celery_events) == len(messages)
    event_varying = ("properties.delivery_tag", "body.clock", "body.timestamp")
    for (their_topic, theirs), (my_topic, mine) in zip(celery_events, our_events, strict=True):
        assert my_topic == their_topic == "/9.celeryev/task.sent"
        assert without(mine, *event_varying) == without(theirs, *event_varying)
    assert [e["body"]["queue"] for _, e in our_events] == ["echo", "vrops", "echo", "echo",
                                                           "echo"]
    clocks = [e["body"]["clock"] for _, e in our_events]
    assert clocks == sorted(clocks) and clocks[0] > celery_events[-1][1]["body"]["clock"]


def test_order_holds_per_queue_across_pipelines(app: Celery, redis_client: redis.Redis) -> None:
    count = PIPELINE_SIZE * 2 + 7
    messages = [TaskMessage("VmPoweredOffEvent", structured(i), "echo" if i % 3 else "vrops")
                for i in range(count)]
    before = redis_client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)
    Publisher(app).publish(messages)
    lpushes = redis_client.info("commandstats")["cmdstat_lpush"]["calls"] - before
    for queue in ("echo", "vrops"):
        ids = [m["headers"]["id"] for m in drain(redis_client, queue)]
        assert ids == [m.task_id for m in messages if m.pool == queue]
    assert lpushes == 2 * 3  # one per queue and round trip of PIPELINE_SIZE messages


def test_task_sent_events_can_be_switched_off(redis_url: str,
                                              redis_client: redis.Redis) -> None:
    app = sender_app(config.load(environ={"VEBAQ_BROKER_URL": redis_url,
                                          "VEBAQ_TASK_SENT_EVENTS": "false"}))
    try:
        before = redis_client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
        Publisher(app).publish(variety())
        after = redis_client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
    finally:
        app.close()
    assert after == before
    assert redis_client.llen("echo") == 4


def test_an_atomic_batch_that_breaks_on_the_way_lands_not_at_all(
        redis_url: str, redis_client: redis.Redis) -> None:
    host, rest = redis_url.removeprefix("redis://").split(":")
    port, db = rest.split("/")
    proxy = CuttableProxy((host, int(port)))
    app = sender_app(config.load(environ={"VEBAQ_BROKER_URL": f"redis://127.0.0.1:{proxy.port}"
                                                              f"/{db}"}))
    publisher = Publisher(app)
    try:
        publisher.publish([TaskMessage("VmPoweredOffEvent", structured(0), "echo")],
                          atomic=True)  # connected, queues declared
        before = redis_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
        batch = [TaskMessage("VmPoweredOffEvent", structured(i, Pad="x" * 4000), "echo")
                 for i in range(1, 301)]
        proxy.hang()  # Redis gets none of what the publisher writes from now on …
        failed: list[BaseException] = []
        sender = threading.Thread(target=lambda: _catch(failed, publisher.publish, batch,
                                                        atomic=True))
        sender.start()
        time.sleep(1.0)
        proxy.cut()  # … and then the connection breaks under it
        sender.join(30)
        assert not sender.is_alive()
        assert failed and isinstance(failed[0], redis.ConnectionError | OSError), failed
        assert redis_client.llen("echo") == 1  # nothing of the broken batch
        proxy.hang(False)
        publisher.publish(batch, atomic=True)  # the sender's resend, in one transaction
        after = redis_client.info("commandstats")["cmdstat_exec"]["calls"]
    finally:
        app.close()
        proxy.close()
    assert after - before == 1
    ids = [m["headers"]["id"] for m in drain(redis_client, "echo")]
    assert ids == ["ev-0:echo", *(m.task_id for m in batch)]
    print(f"\n[atomic publish, connection cut] sent={len(batch)} landed before resend=0 "
          f"after={len(ids) - 1} duplicates={len(ids) - len(set(ids))}")


def _catch(failed: list[BaseException], call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        failed.append(exc)


def test_celerys_event_receiver_sees_each_task_sent_with_its_queue(
        app: Celery, redis_client: redis.Redis) -> None:
    seen: list[dict[str, Any]] = []
    messages = variety()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"task-sent": seen.append})
        capture = threading.Thread(target=lambda: receiver.capture(
            limit=len(messages), timeout=30, wakeup=False), daemon=True)
        capture.start()
        wait_until(lambda: redis_client.execute_command("PUBSUB", "NUMPAT") > 0, 30,
                   "the receiver to subscribe")
        Publisher(app).publish(messages)
        capture.join(30)
    assert [(e["uuid"], e["name"], e["queue"], e["routing_key"]) for e in seen] == [
        (m.task_id, m.subject, m.pool, m.pool) for m in messages]
    assert all(e["type"] == "task-sent" and e["kwargs"].startswith("{'pool': ") for e in seen)


def test_a_real_worker_runs_what_the_own_path_sent(app: Celery, stack_env: dict[str, str],
                                                   log_dir: Path) -> None:
    worker = start_worker("echo", stack_env, log_dir, concurrency=2)
    messages = [m for m in variety() if m.pool == "echo"]
    Publisher(app).publish(messages, atomic=True)
    Publisher(app).publish([TaskMessage("VmPoweredOffEvent", structured(9), "echo")])
    for message in [*messages, TaskMessage("VmPoweredOffEvent", structured(9), "echo")]:
        worker.wait_for(rf"Task {message.subject}\[{message.task_id}\] succeeded", 60)
    worker.stop()
    log = worker.log()
    assert '"event 9 \\u2713 \\u00ab\\u00fc\\u00bb"' in log  # echo's JSON, text intact
    assert "dead letter" not in log and "ERROR" not in log


@pytest.mark.slow
def test_flower_lists_the_tasks_with_their_queue(app: Celery, stack_env: dict[str, str],
                                                 log_dir: Path) -> None:
    port = free_port()
    flower = Proc("flower", [sys.executable, "-m", "celery", "-A", "workers", "flower",
                             f"--port={port}", "--address=127.0.0.1"],
                  {**stack_env, "FLOWER_BASIC_AUTH": "admin:flower-pw"}, log_dir)
    flower.wait_for(r"Visit me at", timeout=60)
    time.sleep(2)  # Flower subscribes to the events after it listens
    messages = variety()
    Publisher(app).publish(messages)

    def listed() -> dict[str, Any] | None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/tasks", headers={
            "Authorization": "Basic " + base64.b64encode(b"admin:flower-pw").decode()})
        with urllib.request.urlopen(request, timeout=10) as answer:
            tasks = json.loads(answer.read())
        return tasks if len(tasks) >= len(messages) else None

    try:
        tasks = wait_until(listed, 60, "Flower to list the tasks")
    finally:
        flower.stop()
    assert {(tid, t["name"], t["routing_key"]) for tid, t in tasks.items()} == {
        (m.task_id, m.subject, m.pool) for m in messages}


def test_the_event_texts_it_encoded_are_what_the_archive_stores(app: Celery) -> None:
    messages = variety()
    encoded: dict[int, str] = {}
    Publisher(app).publish(messages, encoded=encoded)
    events = {id(m.event): m.event for m in messages}
    assert set(encoded) == set(events)  # the shared event once
    for key, text in encoded.items():
        assert text == json.dumps(events[key], separators=(",", ":"), ensure_ascii=False)
