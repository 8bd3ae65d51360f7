"""Worker-side faults on real processes: kill -9 of workers mid-run, a Redis restart while
events flow, vROps down then back. Each test prints sent / handled / duplicates suppressed /
lost (must be 0)."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cloudevents.core.v1.event import CloudEvent
from pyVmomi import vim

from producer.cloudevent import event_id
from tests import counting_functions as counting
from tests.support import RedisServer, VCenter, start_producer, start_worker, wait_until
from vebaq.core.envelope import to_structured
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from workers.app import create_app

pytestmark = pytest.mark.slow


def outgoing(pool: str = "count") -> TaskMessage:
    event = to_structured(CloudEvent({
        "id": str(uuid.uuid4()), "source": "https://vcenter.test/sdk",
        "type": "com.vmware.event.router/event", "subject": "GeneralUserEvent",
        "datacontenttype": "application/json"}, {"Message": "fault test"}))
    return TaskMessage("GeneralUserEvent", event, pool)


def counting_env(stack_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**stack_env, "VEBAQ_FUNCTIONS": "tests.counting_functions",
            "VEBAQ_VISIBILITY_TIMEOUT": "5", **extra}


def suppressed(logs: list[str]) -> int:
    return sum(log.count("duplicate delivery suppressed") for log in logs)


def report(name: str, sent: list[str], r: redis.Redis, logs: list[str]) -> int:
    """Print the counts; returns how many sent event ids have no effect (lost)."""
    effects = {key.decode() for key in r.hkeys(counting.EFFECTS)}
    handled = len(set(sent) & effects)
    runs = sum(int(r.hget(counting.RUNS, event) or 0) for event in sent)
    lost = len(set(sent) - effects)
    print(f"\n[{name}] sent={len(sent)} handled={handled} function runs={runs} "
          f"duplicates suppressed={suppressed(logs)} "
          f"duplicate effects absorbed={int(r.get(counting.DUPLICATE_EFFECTS) or 0)} lost={lost}")
    return lost


def test_kill_9_workers_during_a_thousand_events(stack_env: dict[str, str], log_dir: Path,
                                                 redis_client: redis.Redis) -> None:
    env = counting_env(stack_env, VEBAQ_TEST_WORK="0.05")  # ≈ 80 events/s over 4 processes
    workers = [start_worker("count", env, log_dir, concurrency=2, name=f"count-{i}")
               for i in range(2)]
    batch = [outgoing() for _ in range(1000)]
    Publisher(create_app(broker_url=env["VEBAQ_BROKER_URL"])).publish(batch)
    rng = random.Random(9)
    retired = []
    for kill in range(3):
        target = redis_client.hlen(counting.EFFECTS) + 150
        wait_until(lambda t=target: redis_client.hlen(counting.EFFECTS) >= t, 60,
                   f"progress before kill {kill + 1}", 0.01)
        victim = workers.pop(rng.randrange(len(workers)))
        victim.signal(signal.SIGKILL)  # the main process and its pool children
        victim.popen.wait(10)
        retired.append(victim)
        workers.append(start_worker("count", env, log_dir, concurrency=2,
                                    name=f"count-replacement-{kill}"))
    wait_until(lambda: redis_client.hlen(counting.EFFECTS) == len(batch), 120,
               "every event handled after the kills", 0.2)
    logs = [w.log() for w in workers + retired]
    for worker in workers:
        worker.stop()
    assert report("kill -9 workers x3", [o.event_id for o in batch], redis_client, logs) == 0
    assert redis_client.llen("count") == 0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, callable]]:
    """A redis-server with append-only persistence (fsync always) that the test can restart."""
    try:
        server = RedisServer(tmp_path / "redis-data", "--appendonly", "yes",
                             "--appendfsync", "always", "--maxmemory-policy", "noeviction")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)

    def restart(down_for: float) -> None:
        server.kill()  # a crash: only the append-only file survives
        time.sleep(down_for)
        server.start()

    yield server.url(), restart
    server.stop()


def test_redis_restart_while_events_flow(stack_env: dict[str, str], log_dir: Path,
                                         vcenter: VCenter, own_redis: tuple) -> None:
    url, restart = own_redis
    config = log_dir / "vebaq.yaml"
    config.write_text("triggers: [{name: all, pool: count}]\n")
    env = counting_env(stack_env, VEBAQ_BROKER_URL=url, VEBAQ_CONFIG=str(config))
    r = redis.Redis.from_url(url)
    worker = start_worker("count", env, log_dir, concurrency=2)
    producer = start_producer(env, log_dir)

    posted: list[str] = []
    stop = threading.Event()

    def post_steadily() -> None:
        client = VCenter(env["VCENTER_URL"])
        newest = client.content.eventManager.CreateCollectorForEvents(vim.event.EventFilterSpec())
        newest.SetCollectorPageSize(1)
        while not stop.is_set():
            client.post(vim.event.GeneralUserEvent(message="during a Redis restart"))
            posted.append(event_id(client.instance_uuid, newest.latestPage[0].key))
            time.sleep(0.05)
        client.close()

    poster = threading.Thread(target=post_steadily)
    poster.start()
    wait_until(lambda: r.hlen(counting.EFFECTS) >= 10, 30, "events flowing")
    restart(down_for=3)
    producer.wait_for(r"Redis did not take", timeout=30)
    time.sleep(3)
    stop.set()
    poster.join(30)
    # Every posted event (and the producer's own login events) is handled eventually.
    wait_until(lambda: not set(posted) - {k.decode() for k in r.hkeys(counting.EFFECTS)}, 120,
               f"all {len(posted)} posted events handled after the restart", 0.5)
    logs = [producer.log(), worker.log()]
    producer.stop()
    worker.stop()
    assert report("Redis restart", posted, r, logs) == 0


def test_sigterm_lets_running_tasks_finish_and_returns_the_rest(
        stack_env: dict[str, str], log_dir: Path, redis_client: redis.Redis) -> None:
    env = counting_env(stack_env, VEBAQ_TEST_WORK="1.5")
    worker = start_worker("count", env, log_dir, concurrency=2, name="count-graceful")
    batch = [outgoing() for _ in range(8)]
    Publisher(create_app(broker_url=env["VEBAQ_BROKER_URL"])).publish(batch)
    wait_until(lambda: len(redis_client.hkeys(counting.RUNS)) >= 2, 30, "two tasks running")
    assert worker.stop(timeout=30) == 0  # warm shutdown
    running_then = len(redis_client.hkeys(counting.RUNS))
    assert redis_client.hlen(counting.EFFECTS) == running_then, "running tasks finished"
    waiting = redis_client.llen("count")
    assert waiting == len(batch) - running_then, "the rest is back in the queue, not lost"
    replacement = start_worker("count", env, log_dir, concurrency=2, name="count-after")
    wait_until(lambda: redis_client.hlen(counting.EFFECTS) == len(batch), 60, "all handled")
    logs = [worker.log(), replacement.log()]
    replacement.stop()
    assert report("SIGTERM worker", [o.event_id for o in batch], redis_client, logs) == 0
