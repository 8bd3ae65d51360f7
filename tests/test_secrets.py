"""The whole flow with known secrets: none appears in a log line, in what Flower shows of a task,
in a dead letter, in anything vebaq keeps in Redis, or in the CLI's output."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import (
    ROOT,
    Proc,
    RedisServer,
    Simulator,
    VCenter,
    build_vcsim,
    free_port,
    start_producer,
    start_worker,
    wait_until,
)
from vebaq.core import deadletters
from vebaq.devtools.fake_vrops import FakeVrops

pytestmark = pytest.mark.slow

REDIS_SECRET = "redis-Secret-7f3a"
VC_SECRET = "vc-Secret-91bd"
VROPS_SECRET = "vrops-Secret-c2e8"
FLOWER_SECRET = "flower-Secret-44aa"


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[str]:
    """A password-protected redis-server of this test's own."""
    try:
        server = RedisServer(tmp_path / "redis", password=REDIS_SECRET)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server.url()
    server.stop()


def dump_redis(r: redis.Redis) -> str:
    """Every key and value in the database, as text."""
    parts = []
    for key in r.scan_iter():
        kind = r.type(key).decode()
        value: object = {"string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1),
                         "set": r.smembers, "zset": lambda k: r.zrange(k, 0, -1),
                         "stream": r.xrange}[kind](key)  # the event archive
        parts.append(f"{key!r} {value!r}")
        # Celery bodies are base64: decode them too.
        for item in value if isinstance(value, list) else []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                parts.append(base64.b64decode(json.loads(item)["body"]).decode())
    return "\n".join(parts)


def test_no_secret_anywhere(stack_env: dict[str, str], log_dir: Path, guarded_redis: str,
                            tmp_path: Path) -> None:
    sim = Simulator(build_vcsim(), log_dir, "-username", "admin", "-password", VC_SECRET)
    vc = VCenter(sim.url, "admin", VC_SECRET)
    host = vc.hosts()[0]
    fake = FakeVrops([(host.name, host._moId, vc.instance_uuid)], username="ops",
                     password=VROPS_SECRET).start()
    fake.configure(fail_next=1)  # the first call fails: an error path that must not leak
    config = tmp_path / "vebaq.yaml"
    config.write_text("pools:\n  vrops: {retry: 0}\n")  # fail once → dead letter at once
    env = {**stack_env, "VEBAQ_BROKER_URL": guarded_redis, "VCENTER_URL": sim.url,
           "VCENTER_USER": "admin", "VCENTER_PASSWORD": VC_SECRET, "VEBAQ_CONFIG": str(config),
           "VROPS_URL": fake.url, "VROPS_USER": "ops", "VROPS_PASSWORD": VROPS_SECRET}
    flower_port = free_port()
    flower = Proc("flower", [sys.executable, "-m", "celery", "-A", "workers", "flower",
                             f"--port={flower_port}", "--address=127.0.0.1"],
                  {**env, "FLOWER_BASIC_AUTH": f"admin:{FLOWER_SECRET}"}, log_dir)
    echo = start_worker("echo", env, log_dir)
    vrops = start_worker("vrops", env, log_dir)
    producer = start_producer(env, log_dir)
    flower.wait_for(r"Visit me at", timeout=60)
    r = redis.Redis.from_url(guarded_redis)
    try:
        vc.maintenance(host, enter=True)  # first vROps call fails → dead letter
        wait_until(lambda: deadletters.depth(r) == 1, 30, "the first event dead-lettered")
        vc.maintenance(host, enter=False)
        vc.maintenance(host, enter=True)
        wait_until(lambda: fake.host_state(host._moId, vc.instance_uuid) == "MAINTAINED_MANUAL",
                   30, "the later events mirrored")
        echo.wait_for(r"Task ExitMaintenanceModeEvent\[\S+\] succeeded", timeout=30)

        request = urllib.request.Request(
            f"http://127.0.0.1:{flower_port}/api/tasks",
            headers={"Authorization": "Basic " + base64.b64encode(
                f"admin:{FLOWER_SECRET}".encode()).decode()})
        flower_tasks = wait_until(lambda: _tasks(request), 30, "Flower to list the tasks")
        cli = subprocess.run([sys.executable, "-m", "vebaq", "dlq", "list", "--json"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        letter = json.loads(cli.stdout)[0]
        shown = subprocess.run([sys.executable, "-m", "vebaq", "dlq", "show", letter["id"]],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        tokens = list(fake._tokens)
    finally:
        for proc in (producer, echo, vrops, flower):
            proc.stop()
        fake.stop()
        vc.close()
        sim.stop()

    places = {f"{p.name} log": p.log() for p in (producer, echo, vrops, flower)}
    places["Flower /api/tasks"] = flower_tasks
    places["Redis"] = dump_redis(r)
    places["vebaq dlq list --json"] = cli.stdout + cli.stderr
    places["vebaq dlq show"] = shown.stdout + shown.stderr
    assert "EnteredMaintenanceModeEvent" in flower_tasks and "VropsUnavailable" in shown.stdout
    secrets = {"Redis password": REDIS_SECRET, "vCenter password": VC_SECRET,
               "vROps password": VROPS_SECRET, "Flower password": FLOWER_SECRET,
               **{f"vROps token {i}": token for i, token in enumerate(tokens)}}
    assert tokens, "the worker should have acquired a vROps token"
    leaks = [f"{what} in {where}" for where, text in places.items()
             for what, value in secrets.items() if value in text]
    print(f"\n[secrets] searched {len(places)} places ({sum(map(len, places.values()))} "
          f"characters) for {len(secrets)} secrets: {len(leaks)} found")
    assert not leaks, leaks


def _tasks(request: urllib.request.Request) -> str | None:
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read().decode()
    return body if "ExitMaintenanceModeEvent" in body else None
