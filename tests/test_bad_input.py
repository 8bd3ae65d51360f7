"""Bad input ends the command with one clear line, a non-zero status, and no secret."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Simulator, build_vcsim

PASSWORD = "Pa55-w0rd-never-shown"


def run_vebaq(env_extra: dict[str, str], *args: str, base: dict[str, str],
              timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**base, **env_extra}
    return subprocess.run([sys.executable, "-m", "vebaq", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def base_env(stack_env: dict[str, str]) -> dict[str, str]:
    return {**stack_env, "VCENTER_PASSWORD": PASSWORD}


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


def assert_one_clear_line(result: subprocess.CompletedProcess, expected: str,
                          status: int) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vebaq: error: "), output
    assert expected in lines[-1], output
    assert "Traceback" not in output
    assert PASSWORD not in output and "right-password" not in output
    assert len(lines) <= 2, output  # at most a log line before the error, no storm


def test_unreachable_vcenter(base_env: dict[str, str]) -> None:
    result = run_vebaq({"VCENTER_URL": "http://127.0.0.1:9/sdk"}, "producer", "--metrics-port",
                       "0", base=base_env)
    assert_one_clear_line(result, "vCenter http://127.0.0.1:9/sdk: connection refused", 3)


def test_unknown_vcenter_host(base_env: dict[str, str]) -> None:
    result = run_vebaq({"VCENTER_URL": "https://vc.invalid/sdk"}, "producer", "--metrics-port",
                       "0", base=base_env)
    assert_one_clear_line(result, "unknown host 'vc.invalid'", 3)


def test_wrong_password(base_env: dict[str, str], guarded_vcsim: Simulator) -> None:
    result = run_vebaq({"VCENTER_URL": guarded_vcsim.url, "VCENTER_USER": "admin",
                        "VCENTER_INSECURE_SSL": "true"}, "producer", "--metrics-port", "0",
                       base=base_env)
    assert_one_clear_line(result, "refused the login of 'admin': wrong user name or password", 3)


def test_untrusted_certificate_is_refused_by_default(base_env: dict[str, str],
                                                     guarded_vcsim: Simulator) -> None:
    result = run_vebaq({"VCENTER_URL": guarded_vcsim.url, "VCENTER_USER": "admin"},
                       "producer", "--metrics-port", "0", base=base_env)
    assert_one_clear_line(result, "certificate not trusted", 3)


def test_bad_config_key(base_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "vebaq.yaml"
    config.write_text("vcenter:\n  pollIntervall: 1s\n")
    result = run_vebaq({"VEBAQ_CONFIG": str(config)}, "producer", base=base_env)
    assert_one_clear_line(result, "vcenter.pollIntervall: unknown key", 2)


def test_unknown_pool_in_a_trigger(base_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "vebaq.yaml"
    config.write_text("triggers:\n  - name: t\n    pool: nosuchpool\n")
    result = run_vebaq({"VEBAQ_CONFIG": str(config)}, "producer", base=base_env)
    assert_one_clear_line(result, "triggers[0].pool: unknown pool 'nosuchpool'", 2)
    result = run_vebaq({"VEBAQ_CONFIG": str(config)}, "worker", "--pool", "echo", base=base_env)
    assert_one_clear_line(result, "unknown pool 'nosuchpool'", 2)


def test_malformed_broker_url(base_env: dict[str, str]) -> None:
    result = run_vebaq({"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@redis:port/0"}, "producer",
                       base=base_env)
    assert_one_clear_line(result, "VEBAQ_BROKER_URL: malformed broker URL", 2)


def test_unreachable_redis(base_env: dict[str, str]) -> None:
    result = run_vebaq({"VEBAQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:9/0"}, "producer",
                       base=base_env)
    assert_one_clear_line(result, "cannot reach Redis at redis://:***@127.0.0.1:9/0", 4)


def test_worker_for_an_unknown_pool(base_env: dict[str, str]) -> None:
    result = run_vebaq({}, "worker", "--pool", "nope", base=base_env)
    assert_one_clear_line(result, "--pool: unknown pool 'nope'", 1)
