"""Fixtures on real parts: Redis over TCP, the vCenter simulator, worker and producer processes.

Redis: a ``redis-server`` the session starts on a free loopback port (never a Redis that happens
to run on the machine), or ``$VEBAQ_TEST_REDIS_URL`` when set explicitly. The choice is printed.
Without redis-server the tests that need Redis fail with one line saying how to install it. Tests
use database :data:`TEST_DB` and flush it before each test.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from tests.support import RedisServer, Simulator, VCenter, build_vcsim
from vebaq.core.secrets import redact_url

# In CI, property tests draw the same examples every run: a failure there is reproducible.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

#: The Redis database the tests own (other databases on a shared Redis are left alone).
TEST_DB = int(os.environ.get("VEBAQ_TEST_DB", "9"))


@pytest.fixture(scope="session")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://host:port`` of a real Redis server the session owns."""
    configured = os.environ.get("VEBAQ_TEST_REDIS_URL")
    if configured:
        print(f"\n[vebaq tests] Redis: VEBAQ_TEST_REDIS_URL={redact_url(configured)}")
        yield configured.rstrip("/")
        return
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"), "--appendonly", "no")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    print(f"\n[vebaq tests] Redis: started redis-server on 127.0.0.1:{server.port}")
    yield server.url().removesuffix("/0")
    server.stop()


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
    configured = os.environ.get("VEBAQ_TEST_REDIS_URL")
    source = f"VEBAQ_TEST_REDIS_URL={redact_url(configured)}" if configured else \
        f"a redis-server of their own ({shutil.which('redis-server')}) on a free loopback port"
    return [f"vebaq tests: Redis: {source}, database {TEST_DB}; "
            f"started {time.strftime('%H:%M:%S')}"]
