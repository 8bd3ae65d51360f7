"""Bad input ends every command with one clear line, a non-zero status, and no secret.

One table, one row per bad input of each command (``vebaq producer``, ``vebaq worker``,
``vebaq dev``, ``vebaq dlq …``, ``celery -A workers worker``): each row runs the real command
as a subprocess against real parts (the vCenter simulator, a Redis that wants a password, a
Redis out of memory, a port already taken) and asserts the exit status, exactly one line on
stderr and none on stdout, and that the known password given to it appears nowhere.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from pyVmomi import vim

from tests.support import ROOT, Simulator, VCenter, build_vcsim, start_producer, wait_until
from vebaq.devtools.embedded import free_port

#: The password every row gives where a password goes (vCenter, vROps, Redis URLs).
PASSWORD = "Pa55-w0rd-never-shown"
#: What the password-protected Redis really wants.
REDIS_PASSWORD = "right-redis-password"

VEBAQ = (sys.executable, "-m", "vebaq")
CELERY_WORKER = (sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "echo")


@dataclass(frozen=True)
class Case:
    """One bad input: the command, what it is given, and the line it must end with.

    ``{name}`` in ``argv``, ``env`` and ``config`` is filled in from the fixtures' values:
    ``auth_redis``, ``full_redis``, ``taken_port``, ``guarded_vcsim``, ``config``.
    """

    id: str
    argv: tuple[str, ...]
    expected: str
    status: int
    env: dict[str, str] = field(default_factory=dict)
    #: YAML written to ``{config}`` (and set as ``VEBAQ_CONFIG``) before the run.
    config: str | None = None


def _wrong_redis(url_key: str = "auth_redis") -> dict[str, str]:
    return {"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@{{{url_key}}}/0"}


CASES = [
    # --- vebaq producer
    Case("producer: vCenter refuses connections", (*VEBAQ, "producer", "--metrics-port", "0"),
         "vCenter http://127.0.0.1:9/sdk: connection refused", 3,
         {"VCENTER_URL": "http://127.0.0.1:9/sdk"}),
    Case("producer: unknown vCenter host", (*VEBAQ, "producer", "--metrics-port", "0"),
         "unknown host 'vc.invalid'", 3, {"VCENTER_URL": "https://vc.invalid/sdk"}),
    Case("producer: wrong vCenter password", (*VEBAQ, "producer", "--metrics-port", "0"),
         "refused the login of 'admin': wrong user name or password", 3,
         {"VCENTER_URL": "{guarded_vcsim}", "VCENTER_USER": "admin",
          "VCENTER_INSECURE_SSL": "true"}),
    Case("producer: untrusted vCenter certificate", (*VEBAQ, "producer", "--metrics-port", "0"),
         "certificate not trusted", 3, {"VCENTER_URL": "{guarded_vcsim}", "VCENTER_USER": "admin"}),
    Case("producer: no vCenter configured", (*VEBAQ, "producer", "--metrics-port", "0"),
         "vcenter.url: not set", 2, {"VCENTER_URL": ""}),
    Case("producer: unknown config key", (*VEBAQ, "producer"),
         "vcenter.pollIntervall: unknown key", 2, config="vcenter:\n  pollIntervall: 1s\n"),
    Case("producer: trigger to an unknown pool", (*VEBAQ, "producer"),
         "triggers[0].pool: unknown pool 'nosuchpool'", 2,
         config="triggers:\n  - name: t\n    pool: nosuchpool\n"),
    Case("producer: malformed broker URL", (*VEBAQ, "producer"),
         "VEBAQ_BROKER_URL: malformed broker URL", 2,
         {"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@redis:port/0"}),
    Case("producer: Redis unreachable", (*VEBAQ, "producer"),
         "cannot reach Redis at redis://:***@127.0.0.1:9/0", 4,
         {"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:9/0"}),
    Case("producer: Redis refuses the password", (*VEBAQ, "producer"),
         "Redis at redis://:***@{auth_redis}/0 refused the connection: wrong password", 4,
         _wrong_redis()),
    Case("producer: Redis out of memory", (*VEBAQ, "producer", "--simulate", "--metrics-port",
                                           "0"),
         "Redis is out of memory (maxmemory 2.00M, noeviction): command not allowed", 4,
         {"VEBAQ_BROKER_URL": "redis://{full_redis}/0"}),
    Case("producer: metrics port taken", (*VEBAQ, "producer", "--metrics-port", "{taken_port}"),
         "metrics port {taken_port} is in use", 2),
    Case("producer: metrics port not a number", (*VEBAQ, "producer", "--metrics-port", "http"),
         "Invalid value for '--metrics-port': 'http' is not a valid integer "
         "(see 'vebaq producer --help')", 2),
    # --- vebaq worker
    Case("worker: unknown pool", (*VEBAQ, "worker", "--pool", "nope"),
         "--pool: unknown pool 'nope'", 1),
    Case("worker: trigger to an unknown pool", (*VEBAQ, "worker", "--pool", "echo"),
         "unknown pool 'nosuchpool'", 2, config="triggers:\n  - name: t\n    pool: nosuchpool\n"),
    Case("worker: Redis refuses the password", (*VEBAQ, "worker", "--pool", "echo"),
         "Redis at redis://:***@{auth_redis}/0 refused the connection: wrong password", 4,
         _wrong_redis()),
    Case("worker: Redis unreachable", (*VEBAQ, "worker", "--pool", "echo"),
         "cannot reach Redis at redis://:***@127.0.0.1:9/0", 4,
         {"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:9/0"}),
    Case("worker: unknown execution pool", (*VEBAQ, "worker", "--pool", "echo", "-P", "gevent"),
         "Invalid value for '--pool-impl' / '-P': 'gevent' is not one of", 2),
    Case("worker: time limit beyond the visibility timeout", (*VEBAQ, "worker", "--pool", "echo"),
         "pools.echo.timeLimit: must be > 0 and below broker.visibilityTimeout (300s)", 2,
         config="pools:\n  echo: {timeLimit: 10m}\n"),
    # --- celery -A workers worker
    Case("celery worker: unknown config key", CELERY_WORKER,
         "broker.visibilityTimeOut: unknown key", 2,
         config="broker:\n  visibilityTimeOut: 5m\n"),
    Case("celery worker: Redis refuses the password", CELERY_WORKER,
         "Redis at redis://:***@{auth_redis}/0 refused the connection: wrong password", 4,
         _wrong_redis()),
    Case("celery worker: Redis wants a password", CELERY_WORKER,
         "refused the connection: it needs a password, and the URL has none", 4,
         {"VEBAQ_BROKER_URL": "redis://{auth_redis}/0"}),
    Case("celery worker: maxDeliveries 0", CELERY_WORKER, "pools.echo.maxDeliveries: must be ≥ 1",
         2, config="pools:\n  echo: {maxDeliveries: 0}\n"),
    # --- vebaq dev
    Case("dev: unknown config key", (*VEBAQ, "dev"), "vrops.passwort: unknown key", 2,
         config=f"vrops:\n  passwort: {PASSWORD}\n"),
    Case("dev: Redis refuses the password", (*VEBAQ, "dev"),
         "Redis at redis://:***@{auth_redis}/0 refused the connection: wrong password", 4,
         _wrong_redis()),
    Case("dev: Flower port taken", (*VEBAQ, "dev", "--flower-port", "{taken_port}"),
         "--flower-port {taken_port}: port {taken_port} is in use", 2),
    # --- vebaq dlq
    Case("dlq show: no such dead letter", (*VEBAQ, "dlq", "show", "nope"),
         "no dead letter 'nope' (see `vebaq dlq list`)", 1),
    Case("dlq replay: neither an id nor --all", (*VEBAQ, "dlq", "replay"),
         "give one dead letter ID, or --all (see 'vebaq dlq replay --help')", 2),
    Case("dlq list: Redis refuses the password", (*VEBAQ, "dlq", "list"),
         "Redis at redis://:***@{auth_redis}/0 refused the connection: wrong password", 4,
         _wrong_redis()),
    Case("dlq stats: Redis unreachable", (*VEBAQ, "dlq", "stats"),
         "cannot reach Redis at redis://:***@127.0.0.1:9/0", 4,
         {"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:9/0"}),
    Case("dlq purge: no such config file", (*VEBAQ, "dlq", "--config", "/nonexistent.yaml",
                                            "purge", "--yes"),
         "/nonexistent.yaml: no such configuration file", 2),
]


def _redis_server(*args: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("these rows need redis-server on PATH", pytrace=False)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *args], stdout=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[str]:
    """``host:port`` of a Redis that wants :data:`REDIS_PASSWORD`."""
    proc, where = _redis_server("--requirepass", REDIS_PASSWORD)
    url = f"redis://:{REDIS_PASSWORD}@{where}/0"
    wait_until(lambda: _pings(url), 10, "the password-protected Redis")
    yield where
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def full_redis() -> Iterator[str]:
    """``host:port`` of a Redis at its ``maxmemory`` (2 MiB) with ``noeviction``."""
    proc, where = _redis_server("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    r = redis.Redis.from_url(f"redis://{where}/0")
    wait_until(lambda: _pings(f"redis://{where}/0"), 10, "the small Redis")
    with pytest.raises(redis.OutOfMemoryError):
        for i in range(10_000):
            r.set(f"ballast:{i}", "x" * 10_000)
    yield where
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on (on every address, as the metrics server would)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def guarded_vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """A simulator that accepts one user and password only, over HTTPS (self-signed)."""
    try:
        binary = build_vcsim()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    sim = Simulator(binary, tmp_path_factory.mktemp("guarded"), "-tls", "-username", "admin",
                    "-password", "right-password")
    yield sim
    sim.stop()


@pytest.fixture
def base_env(stack_env: dict[str, str]) -> dict[str, str]:
    return {**stack_env, "VCENTER_PASSWORD": PASSWORD, "VROPS_PASSWORD": PASSWORD}


def _needs(case: Case) -> set[str]:
    text = " ".join([*case.argv, *case.env.values(), case.expected])
    return {name for name in ("auth_redis", "full_redis", "taken_port", "guarded_vcsim")
            if "{" + name + "}" in text}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_ends_the_command_in_one_clear_line(case: Case, base_env: dict[str, str],
                                                      tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    values = {name: request.getfixturevalue(name) for name in _needs(case)}
    if "guarded_vcsim" in values:
        values["guarded_vcsim"] = values["guarded_vcsim"].url
    env = {**base_env, **{k: v.format(**values) for k, v in case.env.items()}}
    if case.config is not None:
        config = tmp_path / "vebaq.yaml"
        config.write_text(case.config, encoding="utf-8")
        env["VEBAQ_CONFIG"] = str(config)
    argv = [arg.format(**values) for arg in case.argv]
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    print(f"\n[bad input] {case.id}: exit {result.returncode} in {took:.1f}s: "
          f"{lines[-1] if lines else '(nothing on stderr)'}")
    assert result.returncode == case.status, output
    assert len(lines) == 1 and result.stdout.strip() == "", output
    assert lines[0].startswith("vebaq: error: "), output
    assert case.expected.format(**values) in lines[0], output
    assert PASSWORD not in output and REDIS_PASSWORD not in output
    assert "right-password" not in output


def test_redis_out_of_memory_while_running_is_named_in_the_producers_log(
        stack_env: dict[str, str], log_dir: Path) -> None:
    """Not a start-up failure: the producer keeps its batch, retries, and says why."""
    proc, where = _redis_server("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    try:
        url = f"redis://{where}/0"
        wait_until(lambda: _pings(url), 10, "the small Redis")
        producer = start_producer({**stack_env, "VEBAQ_BROKER_URL": url}, log_dir)
        r = redis.Redis.from_url(url)
        with pytest.raises(redis.OutOfMemoryError):
            for i in range(10_000):
                r.set(f"ballast:{i}", "x" * 10_000)
        vcenter = VCenter(stack_env["VCENTER_URL"])
        vcenter.post(vim.event.GeneralUserEvent(message="into a full Redis"))
        vcenter.close()
        line = producer.wait_for(r"Redis did not take .*", timeout=60)[0]
        enqueued = producer.log().count("enqueued")
        r.delete(*r.keys("ballast:*"))  # memory freed: the kept batch goes through
        producer.wait_for(r"enqueued \d+ event\(s\)", timeout=60, count=enqueued + 1)
        producer.stop()
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"\n[Redis out of memory while running] {line}")
    assert "keeping them and retrying: Redis is out of memory (maxmemory 4.00M, noeviction): " \
           "command not allowed when used memory > 'maxmemory'" in line
