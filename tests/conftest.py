"""Fixtures on real parts: Redis over TCP, the vCenter simulator, worker and producer processes.

Redis: ``$VEBAQ_TEST_REDIS_URL``, else 127.0.0.1:6379 if it answers, else a ``redis-server`` we
start on a free port, else the embedded (fakeredis) server. The choice is printed, never a
silent skip. Tests use database :data:`TEST_DB` and flush it before each test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from tests.support import Simulator, VCenter, build_vcsim, wait_until
from vebaq.devtools.embedded import EmbeddedRedis, free_port

# In CI, property tests draw the same examples every run: a failure there is reproducible.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

#: The Redis database the tests own (other databases on a shared Redis are left alone).
TEST_DB = int(os.environ.get("VEBAQ_TEST_DB", "9"))


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    """``redis://host:port`` of a real Redis server reachable over TCP."""
    configured = os.environ.get("VEBAQ_TEST_REDIS_URL")
    if configured:
        yield configured.rstrip("/")
        return
    if _answers("redis://127.0.0.1:6379/0"):
        print("\n[vebaq tests] Redis: the local server at 127.0.0.1:6379")
        yield "redis://127.0.0.1:6379"
        return
    server = shutil.which("redis-server")
    if server:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="vebaq-redis-")
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL)
        wait_until(lambda: _answers(f"redis://127.0.0.1:{port}/0"), 10, "redis-server")
        print(f"\n[vebaq tests] Redis: started redis-server on port {port}")
        yield f"redis://127.0.0.1:{port}"
        proc.terminate()
        return
    embedded = EmbeddedRedis().start()
    print(f"\n[vebaq tests] Redis: no server found, using the embedded one on {embedded.port}")
    yield f"redis://127.0.0.1:{embedded.port}"
    embedded.stop()


@pytest.fixture
def redis_url(redis_base: str) -> str:
    """A flushed test database."""
    url = f"{redis_base}/{TEST_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The SDK URL of a running vCenter simulator."""
    if os.environ.get("VEBAQ_VCSIM_URL"):
        yield os.environ["VEBAQ_VCSIM_URL"]
        return
    try:
        binary = build_vcsim()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    simulator = Simulator(binary, tmp_path_factory.mktemp("vcsim"))
    yield simulator.url
    simulator.stop()


@pytest.fixture
def vcenter(vcsim: str) -> Iterator[VCenter]:
    client = VCenter(vcsim)
    yield client
    client.close()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def stack_env(redis_url: str, vcsim: str, tmp_path: Path) -> dict[str, str]:
    """Environment for producer and worker processes of one test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    env.update({
        "VEBAQ_BROKER_URL": redis_url,
        "VCENTER_URL": vcsim,
        "VCENTER_USER": "vebaq",
        "VCENTER_PASSWORD": "s3cret-vc-password",
        "VCENTER_POLL_INTERVAL": "0.2",
        "VCENTER_LATEST_PAGE_FALLBACK": "true",  # the simulator does not page forward
        "PYTHONUNBUFFERED": "1",
    })
    if os.environ.get("VEBAQ_LOG_LEVEL"):  # e.g. DEBUG, to see the producer's every poll
        env["VEBAQ_LOG_LEVEL"] = os.environ["VEBAQ_LOG_LEVEL"]
    return env


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    """A failing test leaves no worker or producer behind to disturb the next one."""
    from tests.support import RUNNING

    yield
    while RUNNING:
        RUNNING.pop().kill()


@pytest.fixture(autouse=True)
def _fresh_worker_settings() -> Iterator[None]:
    """Worker settings are cached per process; tests that change the env get fresh ones."""
    from workers.settings import settings

    settings.cache_clear()
    yield
    settings.cache_clear()


def pytest_report_header() -> list[str]:
    return [f"vebaq tests: Redis database {TEST_DB}, started {time.strftime('%H:%M:%S')}"]
