"""The Docker packaging: compose.yaml, the Dockerfile, .env.example and the demo driver.

* Static tests (no Docker): every command and entry point exists and parses, every environment
  variable a service sets is read by something, every service the README names exists, the
  conventions that make healthchecks, scaling and shutdown work are in place.
* One end-to-end test on a real Docker engine: builds the image, runs the demo profile, sees
  events echoed, maintenance mirrored into the fake vROps, tasks in Flower's API, three echo
  replicas at work, and a stop/start that neither loses nor repeats an event; then tears it all
  down. Without a Docker engine it is skipped with one line saying so (``-ra`` shows it).
* One more on the ``ha`` profile: Redis primary, replica and three Sentinels, the producer and
  workers on the sentinel:// URL, the demo's simulator and driver; the primary's container is
  killed, the Sentinels promote the replica, events go on being handled, none is lost, and the
  old primary comes back as a replica. It prints the promotion and resumption times.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
#: Where the project's own code lives (what "the code reads" means for environment variables).
SOURCE_DIRS = ("vebaq", "producer", "workers")

#: The services the issue asks for, and which of them form the demo profile.
SERVICES = {"redis", "producer", "ingress", "worker-echo", "worker-vrops", "flower"}
DEMO_SERVICES = {"vcsim", "fake-vrops", "demo-driver"}
#: The ``ha`` profile: Redis Sentinel, and the pipeline on its sentinel:// URL.
HA_SERVICES = {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
               "producer-ha", "worker-echo-ha", "worker-vrops-ha"}
WORKERS = ("worker-echo", "worker-vrops")

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """What Compose makes of ``value`` with no variables set: defaults in, ``$$`` → ``$``."""
    return _VARIABLE.sub(lambda m: m.group("default") or "", value).replace("$$", "$")


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert isinstance(cmd, list), "use the exec form (a list) so the command is the main process"
    return [interpolate(str(part)) for part in cmd]


def our_services() -> dict[str, dict[str, Any]]:
    """Services that run the project's image (built from the Dockerfile)."""
    return {name: s for name, s in services().items() if "build" in s}


def source_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for d in SOURCE_DIRS
                     for path in sorted((ROOT / d).rglob("*.py")))


def flower_options() -> set[str]:
    import flower.options  # noqa: F401 - defines the options
    from tornado.options import options

    return {name.replace("-", "_") for name in options._options}  # noqa: SLF001


# --- static: the services and their conventions

def test_services_and_profiles() -> None:
    defined = services()
    assert set(defined) >= SERVICES | DEMO_SERVICES
    for name in SERVICES:
        assert "profiles" not in defined[name], f"{name} must run without a profile"
    for name in DEMO_SERVICES:
        assert defined[name].get("profiles") == ["demo"], f"{name} belongs to the demo profile"
    data = compose()
    assert "version" not in data, "Compose v2 warns on `version:`; 1.29 does not need it"
    assert set(data.get("volumes", {})) >= {"redis-data", "flower-data"}


def test_ha_profile_is_redis_sentinel_without_passwords_in_argv() -> None:
    defined = services()
    for name in HA_SERVICES:
        assert defined[name].get("profiles") == ["ha"], f"{name} belongs to the ha profile"
    replica = " ".join(command(defined["redis-replica"]))
    assert defined["redis-replica"]["environment"]["REPLICA_OF"] == "redis-primary"
    assert "replicaof $REPLICA_OF 6379" in replica and "/tmp/redis.conf" in replica
    for name in ("redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"):
        cmd = " ".join(command(defined[name]))
        # Passwords are printed into a config file by the shell's builtin printf, and the
        # server is started with the file: none on a command line.
        assert "--requirepass" not in cmd and "printf" in cmd, name
        assert "umask 077" in cmd, name
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        cmd = " ".join(command(defined[name]))
        assert "sentinel monitor vebaq redis-primary 6379 2" in cmd
        assert "sentinel announce-hostnames yes" in cmd and "sentinel resolve-hostnames yes" in cmd
        assert defined[name]["environment"]["ANNOUNCE"] == name
    for name in ("producer-ha", "worker-echo-ha", "worker-vrops-ha"):
        env = defined[name]["environment"]
        url = interpolate(env["VEBAQ_BROKER_URL"])
        assert url.startswith("sentinel://") and url.count("sentinel://") == 3, url
        assert env["VEBAQ_BROKER_MASTER_NAME"] == "vebaq"
        assert "SENTINEL_PASSWORD" in env["VEBAQ_SENTINEL_PASSWORD"]
        assert set(defined[name]["depends_on"]) == {"sentinel-1", "sentinel-2", "sentinel-3"}
        from vebaq.core import config
        settings = config.load(environ={k: interpolate(str(v)) for k, v in env.items()
                                        if k.startswith("VEBAQ_")})
        assert settings.broker_master_name == "vebaq"
        from vebaq.core import broker
        options = broker.celery_config(settings)["broker_transport_options"]
        # Bounded connects to the master: a killed container's address may answer nothing at
        # all (seen: a worker stuck in connect() to the old primary for minutes).
        assert 0 < options["socket_connect_timeout"] <= 10, name
    for name in ("worker-echo-ha", "worker-vrops-ha"):
        assert "celery -A workers inspect ping" in defined[name]["healthcheck"]["test"][1], \
            "the app's settings carry the master name (plain `celery` would not)"


def test_one_image_for_every_python_service() -> None:
    ours = our_services()
    assert set(ours) == {"producer", "ingress", "worker-echo", "worker-vrops", "flower",
                         "fake-vrops", "demo-driver", "producer-ha", "worker-echo-ha",
                         "worker-vrops-ha"}
    assert len({s["image"] for s in ours.values()}) == 1
    for name, service in ours.items():
        assert service["build"] in (".", {"context": "."}), name
        assert service.get("init") is True, f"{name}: init: true (tini forwards SIGTERM)"
        assert service.get("restart") in ("unless-stopped", "on-failure", "always"), name
        assert "stop_grace_period" in service, name


def test_workers_scale() -> None:
    for name in WORKERS:
        service = services()[name]
        assert "container_name" not in service, f"{name}: a container_name blocks --scale"
        assert "hostname" not in service, f"{name}: one hostname → duplicate Celery node names"
        assert "ports" not in service, f"{name}: a host port blocks --scale"
        cmd = command(service)
        assert cmd[:2] == ["vebaq", "worker"]
        assert "-n" not in cmd and "--hostname" not in cmd, \
            "vebaq worker names nodes <pool>@%h (unique per container); keep that"
        assert "-c" in cmd, "set the concurrency: the default counts the host's CPUs"


def test_producers_scale_and_share_the_vcenters() -> None:
    """``--scale producer=N``: nothing that must be unique per container, and a file listing
    several vCenters can take over from VCENTER_URL (set empty in .env)."""
    producer = services()["producer"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in producer, f"producer: {key} blocks --scale"
    assert command(producer) == ["vebaq", "producer"]
    assert "${VCENTER_URL-" in COMPOSE_FILE.read_text(), \
        "VCENTER_URL= (empty) in .env must reach the producer empty, not as the demo default"
    readme = (ROOT / "README.md").read_text()
    assert "--scale producer=" in readme and "vcenters:" in readme


def test_healthchecks_really_check() -> None:
    defined = services()
    redis_check = " ".join(defined["redis"]["healthcheck"]["test"])
    assert "REDISCLI_AUTH" in redis_check and "grep -q PONG" in redis_check, \
        "redis-cli ping exits 0 on NOAUTH: check for PONG"
    assert "-a " not in redis_check, "a password on the command line shows in ps"
    for name, port, path in (("producer", 8080, "/healthz"), ("ingress", 8081, "/healthz"),
                             ("flower", 5555, "/healthcheck"),
                             ("fake-vrops", 8090, "/_fake/state")):
        test = defined[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: slim images have no curl"
        compile(test[3], f"{name} healthcheck", "exec")
        assert f"http://127.0.0.1:{port}{path}" in test[3], name
    for name in WORKERS:
        pool = command(defined[name])[command(defined[name]).index("--pool") + 1]
        test = defined[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "inspect ping" in test[1]
        # The node vebaq worker starts is <pool>@%h, and %h is the container's $HOSTNAME.
        assert f'-d "{pool}@$$HOSTNAME"' in test[1], name
    for name, service in defined.items():
        check = service.get("healthcheck")
        if check:
            assert "start_interval" not in check, f"{name}: start_interval needs Compose 2.20"
    assert "healthcheck" not in defined["vcsim"], "the vcsim image has no shell to run one"


def test_worker_node_names_match_the_healthchecks(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `vebaq worker` really passes to Celery: the node name the healthcheck pings."""
    from click.testing import CliRunner

    from vebaq.cli import cli
    from workers.celery import app

    calls: list[list[str]] = []
    monkeypatch.setattr(app, "worker_main", calls.append)
    for name in WORKERS:
        service = services()[name]
        env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
        result = CliRunner().invoke(cli, command(service)[1:], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        argv = calls.pop()
        node = argv[argv.index("-n") + 1]
        assert node.endswith("@%h"), f"{name}: {node} is not unique per container"
        ping = service["healthcheck"]["test"][1]
        assert f'-d "{node.replace("%h", "$$HOSTNAME")}"' in ping, (name, node, ping)
        assert "-E" in argv, f"{name}: Flower needs task events"


def test_startup_order_and_redis_settings() -> None:
    defined = services()
    for name in ("producer", "ingress", "flower", *WORKERS):
        assert defined[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    driver = defined["demo-driver"]["depends_on"]
    assert driver["fake-vrops"]["condition"] == "service_healthy"
    assert driver["producer"]["condition"] == "service_healthy"
    for name in SERVICES:
        for dependency in defined[name].get("depends_on", {}):
            assert dependency in SERVICES, \
                f"{name} (no profile) must not depend on {dependency} (a demo-profile service)"
    redis_cmd = " ".join(command(defined["redis"]))
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert '--requirepass "$REDIS_PASSWORD"' in redis_cmd
    assert "redis-data:/data" in defined["redis"]["volumes"]
    assert "flower-data:/data" in defined["flower"]["volumes"]
    flower_cmd = command(defined["flower"])
    assert "--persistent=True" in flower_cmd and "--db=/data/flower.db" in flower_cmd
    assert "FLOWER_BASIC_AUTH" in defined["flower"]["environment"]
    assert any(p.endswith(":5555") for p in map(interpolate, defined["flower"]["ports"]))


def test_ingress_port_token_and_bind() -> None:
    """The port it listens on is the one published and probed; the token comes from the
    environment (a command line shows in ps), and the host side is loopback unless told."""
    ingress = services()["ingress"]
    cmd = command(ingress)
    port = cmd[cmd.index("--port") + 1]
    (published,) = map(interpolate, ingress["ports"])
    assert published == f"127.0.0.1:8081:{port}"
    assert f"127.0.0.1:{port}/healthz" in ingress["healthcheck"]["test"][3]
    assert "VEBAQ_INGRESS_TOKEN" in ingress["environment"]
    assert not any("TOKEN" in part for part in cmd)
    from vebaq.core.config import load

    env = {k: interpolate(str(v)) for k, v in ingress["environment"].items()}
    assert load(environ=env).ingress.token.reveal() == "vebaq-demo"


def test_demo_points_at_the_simulator_and_the_driver_never_at_vcenter() -> None:
    defined = services()
    env = {k: interpolate(str(v)) for k, v in defined["producer"]["environment"].items()}
    assert env["VCENTER_URL"] == "https://vcsim:8989/sdk"
    assert env["VCENTER_INSECURE_SSL"] == "true"
    assert command(defined["vcsim"]) == ["-l", "0.0.0.0:8989"]
    vrops = {k: interpolate(str(v)) for k, v in defined["worker-vrops"]["environment"].items()}
    fake = command(defined["fake-vrops"])
    assert vrops["VROPS_URL"] == f"http://fake-vrops:{fake[fake.index('--port') + 1]}"
    assert vrops["VROPS_USER"] == fake[fake.index("--user") + 1]
    assert vrops["VROPS_PASSWORD"] == fake[fake.index("--password") + 1]
    assert fake[fake.index("--bind") + 1] == "0.0.0.0"
    # The driver changes things: it gets the simulator's address literally, never ${VCENTER_URL}.
    driver_env = defined["demo-driver"]["environment"]
    assert driver_env["VCENTER_URL"] == "https://vcsim:8989/sdk"
    assert all("$" not in str(v) for v in driver_env.values())


# --- static: commands, entry points and environment variables exist

def test_every_command_exists() -> None:
    from vebaq.cli import cli

    for name, service in our_services().items():
        cmd = command(service)
        if cmd[0] == "vebaq":
            assert cmd[1] in cli.commands, f"{name}: no `vebaq {cmd[1]}`"
            # Parses the options exactly as `vebaq` would (unknown worker options go to Celery).
            cli.commands[cmd[1]].make_context(cmd[1], cmd[2:])
        elif cmd[:2] == ["python", "-m"]:
            module = cmd[2]
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
            help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=60,
                                       check=True).stdout
            for flag in (a.split("=", 1)[0] for a in cmd[3:] if a.startswith("--")):
                assert flag in help_text, f"{name}: `python -m {module}` has no {flag}"
        elif cmd[:3] == ["celery", "-A", "workers"]:
            assert cmd[3] == "flower", name
            assert importlib.util.find_spec("workers") is not None
            known = flower_options()
            for option in cmd[4:]:
                key = option.lstrip("-").split("=", 1)[0].replace("-", "_")
                assert key in known, f"{name}: flower has no option --{key}"
        else:
            pytest.fail(f"{name}: unexpected command {cmd}")


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert re.search(r"^USER 10001(:10001)?$", text, re.M), "run as uid 10001, not root"
    assert "PYTHONUNBUFFERED=1" in text
    assert "pip install --no-cache-dir" in text
    for instruction in ("CMD", "ENTRYPOINT"):
        for line in (x for x in lines if x.startswith(instruction + " ")):
            argv = json.loads(line[len(instruction) + 1:])  # exec form, or this raises
            assert isinstance(argv, list)
            if argv and argv[0] == "vebaq":
                import tomllib

                scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
                    "scripts"]
                assert "vebaq" in scripts
    for line in (x for x in lines if x.startswith("COPY ")):
        for source in shlex.split(line)[1:-1]:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    ignore = (ROOT / ".dockerignore").read_text()
    assert ".venv" in ignore or ignore.lstrip().startswith("*"), ".venv must not be sent"


def test_every_variable_a_service_sets_is_read() -> None:
    code = source_text()
    known_flower = flower_options()
    unread = []
    for name, service in services().items():
        own = " ".join(map(str, [service.get("command", ""),
                                 service.get("healthcheck", {}).get("test", "")]))
        for variable in service.get("environment", {}):
            if re.search(rf"[\"']{re.escape(variable)}[\"']", code):
                continue  # the project reads it
            if variable.startswith("FLOWER_") and variable[7:].lower() in known_flower:
                continue  # Flower reads FLOWER_<OPTION>
            if re.search(rf"\$\$?{{?{re.escape(variable)}\b", own):
                continue  # the service's own command or healthcheck uses it
            unread.append(f"{name}: {variable}")
    assert not unread, f"set but read by nothing: {unread}"


def test_env_example_documents_every_variable() -> None:
    used = {m.group("name") for m in _VARIABLE.finditer(COMPOSE_FILE.read_text())}
    text = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.M))
    assert used - documented == set(), "document these in .env.example"
    assert documented - used == set(), ".env.example names variables compose.yaml ignores"
    for line in text.splitlines():
        match = re.match(r"^[A-Z_]*(?:PASSWORD|TOKEN)=(.*)$", line)
        if match:
            assert match.group(1).startswith("change-me"), "no real secrets in .env.example"
    assert re.search(r"^\.env$", (ROOT / ".gitignore").read_text(), re.M)


def code_fragments(markdown: str) -> list[str]:
    """The lines of fenced code blocks and the inline `code` spans of a Markdown text."""
    fragments, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            fragments.append(line)
        else:
            fragments.extend(re.findall(r"`([^`]+)`", line))
    return fragments


def readme_services(markdown: str) -> set[str]:
    """Service names the README uses: in `docker compose …` commands and `worker-…` names."""
    names: set[str] = set()
    global_values = {"-p", "--project-name", "-f", "--file", "--profile", "--env-file",
                     "--project-directory", "--ansi"}
    command_values = {"--tail", "-t", "--timeout", "--index", "-e", "--env", "-u", "--user",
                      "-w", "--workdir", "--scale", "--since", "--until", "--entrypoint"}
    service_args = {"up", "start", "stop", "restart", "logs", "ps", "build", "pull", "rm",
                    "kill", "pause", "unpause", "create", "top", "events", "images"}
    one_service = {"exec", "run", "port"}
    for fragment in code_fragments(markdown):
        names.update(re.findall(r"^(worker-[a-z0-9]+)$", fragment.strip()))
        for match in re.finditer(r"docker[ -]compose\s+([^#;&|]*)", fragment):
            names.update(re.findall(r"--scale[= ]([a-z0-9-]+)=", match.group(1)))
            sub = None
            words = iter(match.group(1).split())
            for word in words:
                if word in (command_values if sub else global_values):
                    next(words, None)
                elif word.startswith("-"):
                    continue
                elif sub is None:
                    sub = word
                    if sub not in service_args | one_service:
                        break
                elif re.fullmatch(r"[a-z][a-z0-9-]*", word):
                    names.add(word)
                    if sub in one_service:
                        break
                else:
                    break
    return names


def test_every_service_the_readme_names_exists() -> None:
    readme = ROOT / "README.md"
    named = readme_services(readme.read_text()) if readme.exists() else set()
    missing = named - set(services())
    assert not missing, f"README.md names services compose.yaml does not define: {missing}"


def test_readme_parser() -> None:
    text = ("```sh\n"
            "docker compose --profile demo up -d\n"
            "docker compose logs -f worker-echo   # events\n"
            "docker compose up -d --scale worker-echo=4\n"
            "docker compose exec fake-vrops python -c 'print(1)'\n"
            "docker compose -f compose.yaml stop --timeout 30 producer flower && echo done\n"
            "```\n"
            "Run docker compose up and watch: prose is not a command.\n"
            "The `worker-vrops` service mirrors maintenance mode; see `docker compose ps redis`.\n")
    assert readme_services(text) == {"worker-echo", "fake-vrops", "producer", "flower",
                                     "worker-vrops", "redis"}


# --- the demo driver, on the test simulator (fast enough; it needs no Docker)

def test_demo_driver_refuses_what_is_not_a_simulator() -> None:
    from vebaq.core.config import VCenterSettings
    from vebaq.devtools.demo import NotASimulator, check_simulator
    from vebaq.devtools.fake_vrops import FakeVrops

    with FakeVrops() as other, pytest.raises(NotASimulator, match="only drives simulators"):
        check_simulator(VCenterSettings(url=f"{other.url}/sdk"))  # HTTP, but not vcsim


@pytest.mark.slow
def test_demo_driver_makes_maintenance_and_power_events(vcsim: str, monkeypatch,
                                                        caplog) -> None:
    from pyVmomi import vim

    from tests.support import VCenter
    from vebaq.devtools import demo
    from vebaq.devtools.fake_vrops import MAINTAINED, FakeVrops

    monkeypatch.setenv("VCENTER_URL", vcsim)
    monkeypatch.setenv("VCENTER_USER", "demo")
    monkeypatch.setenv("VCENTER_PASSWORD", "demo-password")
    caplog.set_level(logging.INFO, logger="vebaq.demo")
    vcenter = VCenter(vcsim)
    try:
        before = max(e.key for e in vcenter.content.eventManager.QueryEvents(
            vim.event.EventFilterSpec()))
        with FakeVrops() as fake:
            assert demo.main(["--interval", "0", "--count", "4", "--fake-vrops", fake.url]) == 0
            registered = {r["moref"]: r for r in fake.snapshot()["resources"].values()}
            assert {h._moId for h in vcenter.hosts()} == set(registered)
            assert {r["vcUuid"] for r in registered.values()} == {vcenter.instance_uuid}
            assert MAINTAINED not in {r["resourceState"] for r in registered.values()}
        collector = vcenter.content.eventManager.CreateCollectorForEvents(
            vim.event.EventFilterSpec())
        collector.SetCollectorPageSize(1000)
        new = [e for e in collector.latestPage if e.key > before]
        kinds = Counter(type(e).__name__.rsplit(".", 1)[-1] for e in new)
        assert kinds["EnteredMaintenanceModeEvent"] == 1
        assert kinds["ExitMaintenanceModeEvent"] == 1
        assert kinds["VmPoweredOffEvent"] == 1 and kinds["VmPoweredOnEvent"] == 1
        entered = next(e for e in new if isinstance(e, vim.event.EnteredMaintenanceModeEvent))
        assert entered.host.name and entered.datacenter.name and entered.computeResource
    finally:
        vcenter.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "vebaq.demo"]
    actions = [line for line in lines if "success" in line]
    assert len(actions) == 4, lines  # one line per action
    assert "entered maintenance mode" in actions[0] and "powered off" in actions[1]
    assert "exited maintenance mode" in actions[2] and "powered on" in actions[3]


# --- end to end on a real Docker engine

#: The whole end-to-end test must finish within this many seconds.
E2E_BUDGET = 540
#: The same for the Sentinel failover test (the image is usually built already).
HA_BUDGET = 360
#: Compose project names: ``vebaq-e2e-<pid>``, so that two test runs on one engine never meet.
PROJECT_PREFIX = "vebaq-e2e-"
#: Services `docker compose stop` stops in the restart step: vebaq itself. vcsim and fake-vrops
#: stand for vCenter and vROps, which do not restart with vebaq (and keep no state across a
#: restart), and the driver keeps making events while vebaq is down.
VEBAQ_SERVICES = ("redis", "producer", "ingress", "worker-echo", "worker-vrops", "flower")


def docker_engine() -> str | None:
    """Why Docker cannot be used here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "no `docker` command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return f"`docker info` failed: {(info.stderr.strip().splitlines() or ['?'])[-1]}"
    try:
        version = subprocess.run(["docker", "compose", "version"], capture_output=True,
                                 text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker compose version` did not answer within 30 s"
    if version.returncode != 0:
        return "`docker compose` is not available (Compose v2, or docker-compose 1.29 as a plugin)"
    return None


class Stack:
    """``docker compose -p vebaq-e2e-<pid> --profile demo …`` with its own ports and passwords."""

    def __init__(self, tmp: Path, deadline: float, profiles: tuple[str, ...] = ("demo",),
                 image: str = "vebaq:e2e", budget: float = E2E_BUDGET) -> None:
        self.deadline = deadline
        self.budget = budget
        self.ports = {"FLOWER_PORT": free_port(), "FAKE_VROPS_PORT": free_port(),
                      "VCSIM_PORT": free_port(), "INGRESS_PORT": free_port()}
        self.flower_auth = ("e2e-admin", "e2e-flower-pw")
        self.ingress_token = "e2e-ingress-token"
        settings = {**{k: str(v) for k, v in self.ports.items()},
                    "VEBAQ_IMAGE": image, "DEMO_INTERVAL": "1",
                    "REDIS_PASSWORD": "e2e-redis-pw", "SENTINEL_PASSWORD": "e2e-sentinel-pw",
                    "FLOWER_USER": self.flower_auth[0],
                    "FLOWER_PASSWORD": self.flower_auth[1], "VCENTER_POLL_INTERVAL": "0.5s",
                    "INGRESS_TOKEN": self.ingress_token}
        # A developer's .env (say, a real vCenter) must not leak in: our own env file, and
        # none of compose.yaml's variables from this process's environment.
        env_file = tmp / "e2e.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        names = {m.group("name") for m in _VARIABLE.finditer(COMPOSE_FILE.read_text())}
        self.env = {k: v for k, v in os.environ.items()
                    if k not in names and not k.startswith("COMPOSE_")}
        self.project = f"{PROJECT_PREFIX}{os.getpid()}"
        self.base = ["docker", "compose", "--env-file", str(env_file), "-p", self.project,
                     "-f", str(COMPOSE_FILE)]
        for profile in profiles:
            self.base += ["--profile", profile]

    def left(self, cap: float) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the end-to-end test ran over its {self.budget:.0f}s budget")
        return min(cap, remaining)

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            quiet: bool = False) -> str:
        started = time.monotonic()
        result = subprocess.run([*self.base, *args], cwd=ROOT, env=self.env, text=True,
                                capture_output=True, timeout=self.left(timeout))
        if not quiet:
            print(f"[e2e] docker compose {' '.join(args)}: {time.monotonic() - started:.1f}s")
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed "
                                 f"({result.returncode}):\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}")
        return result.stdout

    def wait(self, condition, timeout: float, what: str, interval: float = 1.0):
        """Poll ``condition``; a service that does not answer yet counts as "not yet"."""
        last_error: list[BaseException] = []

        def attempt() -> Any:
            try:
                return condition()
            except (OSError, ValueError) as exc:  # URLError, connection reset, bad JSON
                last_error[:] = [exc]
                return None

        try:
            return wait_until(attempt, self.left(timeout), what, interval=interval)
        except AssertionError as exc:
            if last_error:
                raise AssertionError(f"{exc} (last error: {last_error[0]!r})") from None
            raise

    def logs(self, service: str) -> dict[str, str]:
        """Container → its log text (`docker compose logs` interleaves replicas)."""
        out = self.run("logs", "--no-color", service, timeout=60, quiet=True)
        per: dict[str, list[str]] = {}
        for line in out.splitlines():
            match = re.match(r"^(\S+)\s+\| ?(.*)$", line)
            if match:
                per.setdefault(match.group(1), []).append(match.group(2))
        return {name: "\n".join(lines) for name, lines in per.items()}

    def states(self, stopped: bool = False) -> dict[str, tuple[str, str]]:
        """Container name → (state, health or '') of every running container of the project
        (also the stopped ones with ``stopped``)."""
        ids = self.run("ps", *(["-a"] if stopped else []), "-q", timeout=60, quiet=True).split()
        if not ids:
            return {}
        out = subprocess.run(["docker", "inspect", "--format",
                              "{{.Name}} {{.State.Status}} "
                              "{{if .State.Health}}{{.State.Health.Status}}{{end}}", *ids],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        states = {}
        for line in out.splitlines():
            name, state, *health = line.split()
            states[name.lstrip("/")] = (state, health[0] if health else "")
        return states

    def healthy(self, services: tuple[str, ...] | None = None) -> bool:
        states = self.states()
        wanted = {n: s for n, s in states.items()
                  if services is None or any(f"{svc}" in n for svc in services)}
        return bool(wanted) and all(state == "running" and health in ("", "healthy")
                                    for state, health in wanted.values())

    def http(self, port_name: str, path: str, auth: tuple[str, str] | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[port_name]}{path}")
        if auth:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def diagnose(self) -> None:
        print("[e2e] --- state and recent logs, for diagnosis ---")
        try:
            print(self.run("ps", timeout=60, check=False))
            print(self.run("logs", "--no-color", "--tail=40", timeout=60, check=False)[-20000:])
        except Exception as exc:  # noqa: BLE001 - diagnosis must not hide the real failure
            print(f"[e2e] could not collect logs: {exc}")


def echoed(log: str) -> list[tuple[str, str]]:
    """``(subject, id)`` of every CloudEvent the echo function printed, in order."""
    found = []
    for match in re.finditer(r"CloudEvent (\S+)\n((?:  \S.*\n)+?)  data:", log):
        event_id = re.search(r"^  id: (\S+)$", match.group(2), re.M)
        if event_id:
            found.append((match.group(1), event_id.group(1)))
    return found


def echoed_by_container(stack: Stack) -> dict[str, list[tuple[str, str]]]:
    return {name: echoed(text + "\n") for name, text in stack.logs("worker-echo").items()}


def simulator_events(stack: Stack) -> tuple[str, list[Any]]:
    """The simulator's instance UUID and its events (it keeps the newest 1000)."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim

    si = SmartConnect(host="127.0.0.1", port=stack.ports["VCSIM_PORT"], user="e2e",
                      pwd="e2e", disableSslCertValidation=True)
    try:
        content = si.RetrieveContent()
        collector = content.eventManager.CreateCollectorForEvents(vim.event.EventFilterSpec())
        collector.SetCollectorPageSize(1000)
        events = list(collector.latestPage)
        collector.DestroyCollector()
        return content.about.instanceUuid, events
    finally:
        Disconnect(si)


def producer_starts(log: str) -> list[tuple[datetime, str]]:
    """``(begin, how)`` of each "reading vCenter … from <begin> (<how>)" line."""
    return [(datetime.fromisoformat(m.group(1)), m.group(2)) for m in re.finditer(
        r"reading vCenter \S+ \(instance \S+\) from (\S+) \(([^)]*)\)", log)]


def checkpoint_key(log: str) -> int:
    keys = [int(k) for k in re.findall(r"checkpoint at event (\d+)", log)]
    return max(keys) if keys else -1


def remove_abandoned_stacks(stack: Stack) -> None:
    """``down -v`` the stacks of earlier test runs whose process is gone (killed mid-test)."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", "label=com.docker.compose.project",
                          "--format", '{{.Label "com.docker.compose.project"}}'],
                         capture_output=True, text=True, timeout=60).stdout
    for project in sorted(set(out.split())):
        pid = project.removeprefix(PROJECT_PREFIX)
        if project.startswith(PROJECT_PREFIX) and pid.isdigit() and \
                not Path(f"/proc/{pid}").exists():
            print(f"[e2e] removing the abandoned stack {project}")
            subprocess.run([*stack.base[:4], "-p", project, *stack.base[6:], "down", "-v",
                            "--remove-orphans", "--timeout", "10"], cwd=ROOT, env=stack.env,
                           capture_output=True, timeout=180)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from running_stack(Stack(tmp_path, time.monotonic() + E2E_BUDGET))


@pytest.fixture
def ha_stack(tmp_path: Path) -> Iterator[Stack]:
    """The ``ha`` and ``demo`` profiles, on an image tag of their own (another run may be
    building ``vebaq:e2e`` from other code at the same time)."""
    yield from running_stack(Stack(tmp_path, time.monotonic() + HA_BUDGET, ("ha", "demo"),
                                   image="vebaq:e2e-ha", budget=HA_BUDGET))


def running_stack(stack: Stack) -> Iterator[Stack]:
    """Yield ``stack``; diagnose a failure; ``down -v`` whatever happens."""
    reason = docker_engine()
    if reason:
        pytest.skip(f"compose end-to-end test NOT RUN: no Docker engine here ({reason}); "
                    f"start Docker (Docker Engine or Docker Desktop) to run it")
    remove_abandoned_stacks(stack)
    try:
        yield stack
    except BaseException:
        stack.diagnose()
        raise
    finally:
        started = time.monotonic()
        subprocess.run([*stack.base, "down", "-v", "--remove-orphans", "--timeout", "30"],
                       cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=180)
        print(f"[e2e] docker compose down -v: {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_compose_demo_stack_end_to_end(stack: Stack) -> None:
    from producer.cloudevent import event_id

    t0 = time.monotonic()
    stack.run("build", timeout=400)

    # 1. Up, and healthy.
    stack.run("up", "-d", timeout=240)
    stack.wait(lambda: stack.healthy(("redis", "producer", "ingress", "flower", "fake-vrops")),
               120, "redis, producer, ingress, flower and fake-vrops to be healthy")
    print(f"[e2e] stack up and healthy after {time.monotonic() - t0:.0f}s")

    # 2a. Events from the simulator, printed by worker-echo: attributes and data.
    def maintenance_echoed() -> str | None:
        for text in stack.logs("worker-echo").values():
            match = re.search(r"CloudEvent EnteredMaintenanceModeEvent\n(?:  .*\n?)+", text)
            if match and "FullFormattedMessage" in match.group(0):
                return match.group(0)
        return None

    block = stack.wait(maintenance_echoed, 90, "worker-echo to print an "
                       "EnteredMaintenanceModeEvent")
    for attribute in ("  id: ", "  source: https://vcsim:8989/sdk",
                      "  type: com.vmware.event.router/event",
                      "  subject: EnteredMaintenanceModeEvent", "  vcenteruuid: ", "  data:",
                      '"Host": {', "has entered maintenance mode"):
        assert attribute in block, attribute

    # 2b. Maintenance mirrored into the fake vROps: MAINTAINED_MANUAL, then STARTED again.
    def mirrored() -> dict | None:
        history = stack.http("FAKE_VROPS_PORT", "/_fake/state")["history"]
        for i, change in enumerate(history):
            if change["method"] == "PUT" and change["after"] == "MAINTAINED_MANUAL":
                for later in history[i + 1:]:
                    if later["resource"] == change["resource"] and later["method"] == "DELETE" \
                            and later["after"] == "STARTED":
                        return change
        return None

    host = stack.wait(mirrored, 90, "a host mirrored MAINTAINED_MANUAL then STARTED in the "
                      "fake vROps (worker-vrops → fake-vrops)")
    print(f"[e2e] {host['name']} mirrored MAINTAINED_MANUAL → STARTED in the fake vROps")

    # 3. Tasks named after event subjects, through Flower's API, with basic auth.
    with pytest.raises(urllib.error.HTTPError) as refused:
        stack.http("FLOWER_PORT", "/api/tasks")
    assert refused.value.code == 401

    def flower_tasks() -> dict:
        return stack.http("FLOWER_PORT", "/api/tasks?taskname=EnteredMaintenanceModeEvent",
                          auth=stack.flower_auth)

    tasks = stack.wait(flower_tasks, 60, "Flower to list EnteredMaintenanceModeEvent tasks")
    assert {t["name"] for t in tasks.values()} == {"EnteredMaintenanceModeEvent"}
    assert {t["routing_key"] for t in tasks.values()} >= {"echo", "vrops"}
    assert any(t["state"] == "SUCCESS" for t in tasks.values())
    a_task = next(iter(tasks))

    # 4. Three echo workers: scale, and see each one consume events.
    stack.run("up", "-d", "--scale", "worker-echo=3", timeout=120)
    before = {name: len(ids) for name, ids in echoed_by_container(stack).items()}

    def three_consumers() -> list[str] | None:
        busy = [name for name, ids in echoed_by_container(stack).items()
                if len(ids) > before.get(name, 0)]
        return busy if len(busy) >= 3 else None

    busy = stack.wait(three_consumers, 120, "3 worker-echo replicas to echo events", 2.0)
    workers = stack.http("FLOWER_PORT", "/api/workers?refresh=1", auth=stack.flower_auth)
    echo_nodes = {name for name in workers if name.startswith("echo@")}
    assert len(echo_nodes) == 3, workers.keys()
    print(f"[e2e] 3 echo workers consumed events: {sorted(busy)}; Flower: {sorted(echo_nodes)}")
    stack.wait(stack.healthy, 120, "every container healthy (workers answer inspect ping)", 3.0)

    # 5. Stop and start vebaq (Redis volume kept) while the simulator goes on making events.
    stopped_at = datetime.now().astimezone()
    stack.run("stop", *VEBAQ_SERVICES, timeout=240)
    time.sleep(6)  # the driver acts every second: events happen while vebaq is down
    restarted_at = datetime.now().astimezone()
    stack.run("start", *VEBAQ_SERVICES, timeout=240)

    def resumed() -> bool:
        starts = producer_starts("\n".join(stack.logs("producer").values()))
        return len(starts) >= 2 and starts[-1][1].startswith("checkpoint: event")

    stack.wait(resumed, 90, "the producer to restart from its checkpoint in Redis", 2.0)
    producer_log = "\n".join(stack.logs("producer").values())
    starts = producer_starts(producer_log)
    assert starts[0][1].startswith("no checkpoint"), starts
    floor = starts[0][0]  # the first start: events before it were never the producer's

    # Every simulator event since the first start, up to where the producer got, echoed
    # exactly once — the ones made while vebaq was down included.
    target = checkpoint_key(producer_log)
    instance, events = simulator_events(stack)
    expected = {event_id(instance, e.key): e for e in events
                if e.createdTime >= floor and e.key <= target}
    during = [e for e in expected.values() if stopped_at <= e.createdTime <= restarted_at]
    assert during, "the driver made no event while vebaq was stopped"

    def all_echoed() -> Counter | None:
        counts = Counter(i for ids in echoed_by_container(stack).values() for _, i in ids)
        return counts if set(expected) <= set(counts) else None

    try:
        counts = stack.wait(all_echoed, 90, "every event up to the checkpoint to be echoed", 2.0)
    except AssertionError:
        counts = Counter(i for ids in echoed_by_container(stack).values() for _, i in ids)
        missing = sorted(e.key for i, e in expected.items() if i not in counts)
        raise AssertionError(f"events skipped (never echoed), keys: {missing}") from None
    twice = {i: n for i, n in counts.items() if n > 1}
    assert not twice, f"events echoed more than once: {twice}"
    _, now = simulator_events(stack)  # the driver went on: events newer than `expected`
    assert set(counts) <= {event_id(instance, e.key) for e in now}, "echoed unknown events"
    suppressed = sum(text.count("duplicates_suppressed': ['echo']")
                     for text in stack.logs("worker-echo").values())
    print(f"[e2e] restart: {len(expected)} events (keys ≤ {target}, {len(during)} made while "
          f"vebaq was down) each echoed exactly once; redeliveries suppressed by the workers: "
          f"{suppressed}")

    # Flower kept its state on its volume across the restart.
    stack.wait(lambda: stack.healthy(("flower",)), 60, "flower healthy again")
    assert a_task in stack.http("FLOWER_PORT", "/api/tasks?taskname=EnteredMaintenanceModeEvent",
                                auth=stack.flower_auth), "Flower lost its tasks on restart"

    # 6. A CloudEvent from another source, POSTed to the ingress, is echoed too.
    sent = {"specversion": "1.0", "id": f"e2e-ingress-{os.getpid()}", "source": "/e2e/webhook",
            "type": "com.example.e2e.ping", "subject": "E2eWebhookEvent",
            "datacontenttype": "application/json", "data": {"hello": "from the ingress"}}
    stack.wait(lambda: stack.healthy(("ingress",)), 60, "the ingress healthy again")
    url = f"http://127.0.0.1:{stack.ports['INGRESS_PORT']}/"

    def ingress_post(token: str) -> int:
        request = urllib.request.Request(url, data=json.dumps(sent).encode(), method="POST",
                                         headers={"Content-Type": "application/cloudevents+json",
                                                  "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert ingress_post("wrong") == 401
    assert stack.wait(lambda: ingress_post(stack.ingress_token) == 202 or None, 30,
                      "the ingress to accept an event")

    def ingress_echoed() -> bool:
        return any(("E2eWebhookEvent", sent["id"]) in ids
                   for ids in echoed_by_container(stack).values())

    stack.wait(ingress_echoed, 60, "worker-echo to print the event POSTed to the ingress")
    print("[e2e] an event POSTed to the ingress was echoed by worker-echo")

    print(f"[e2e] done in {time.monotonic() - t0:.0f}s (teardown follows)")


#: The `ha` profile's Redis servers and Sentinels.
HA_REDIS = ("redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3")
#: What the failover test runs: the Sentinel setup, the pipeline on it, and the demo's
#: simulator and fake vROps. Not the plain producer, workers, Redis, ingress or Flower: only one
#: pipeline reads the simulator, and every event echoed is the ha pipeline's.
HA_PIPELINE = ("vcsim", "fake-vrops", "producer-ha", "worker-echo-ha", "worker-vrops-ha")


def sentinel_master(stack: Stack, sentinel: str = "sentinel-1") -> str | None:
    """The master's host as ``sentinel`` names it (None when it does not answer)."""
    out = stack.run("exec", "-T", sentinel, "sh", "-c",
                    'REDISCLI_AUTH="$SENTINEL_PASSWORD" redis-cli -p 26379 '
                    "sentinel get-master-addr-by-name vebaq", timeout=30, check=False,
                    quiet=True).split()
    return out[0] if out else None


def replication(stack: Stack, service: str) -> dict[str, str]:
    """``INFO replication`` of one of the ha profile's Redis servers, as a dict."""
    out = stack.run("exec", "-T", service, "sh", "-c",
                    'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli info replication', timeout=30,
                    check=False, quiet=True)
    return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)


def service_states(stack: Stack) -> dict[str, str]:
    """Service → state of the project's containers (``<project>_<service>_1`` with Compose 1.29,
    ``<project>-<service>-1`` with v2)."""
    prefix = re.compile(rf"^{re.escape(stack.project)}[-_](.*)[-_]\d+$")
    return {prefix.sub(r"\1", name): state
            for name, (state, _) in stack.states(stopped=True).items()}


def handled_by_echo_ha(stack: Stack) -> Counter:
    """Event id → how many times worker-echo-ha printed it."""
    return Counter(i for text in stack.logs("worker-echo-ha").values()
                   for _, i in echoed(text + "\n"))


def mirrored_changes(stack: Stack) -> int:
    """How many maintenance changes the fake vROps took (PUTs and DELETEs of worker-vrops-ha)."""
    return len(stack.http("FAKE_VROPS_PORT", "/_fake/state")["history"])


@pytest.mark.slow
def test_compose_ha_profile_survives_a_redis_primary_crash(ha_stack: Stack) -> None:
    """The ``ha`` profile for real: Sentinels promote the replica when the primary's container
    is killed, and the producer and workers go on on the promoted one, losing no event."""
    from producer.cloudevent import event_id

    stack = ha_stack
    t0 = time.monotonic()
    stack.run("build", "producer-ha", timeout=400)  # one image for every Python service

    # 1. Redis, Sentinels and the pipeline up; then the driver, which makes the events (with
    #    --no-deps: it depends on the plain producer, which is not run here).
    stack.run("up", "-d", *HA_REDIS, *HA_PIPELINE, timeout=240)
    stack.wait(lambda: stack.healthy((*HA_REDIS, "producer-ha", "fake-vrops")), 120,
               "the Redis servers, Sentinels, producer-ha and fake-vrops to be healthy", 2.0)
    assert sentinel_master(stack) == "redis-primary"
    stack.run("up", "-d", "--no-deps", "demo-driver", timeout=120)
    print(f"[e2e-ha] up and healthy after {time.monotonic() - t0:.0f}s")
    assert set(service_states(stack)) == {*HA_REDIS, *HA_PIPELINE, "demo-driver"}
    # No password in any process' argv (the servers read theirs from files, the rest from
    # the environment): every process of every container, as the host's ps shows them.
    top = stack.run("top", timeout=60, quiet=True)
    assert "redis-server *:6379" in top and "[sentinel]" in top and "vebaq worker" in top, top
    for secret in ("e2e-redis-pw", "e2e-sentinel-pw"):
        assert secret not in top, f"a password in a process' command line:\n{top}"

    # 2. Events handled before the crash: echoed, and maintenance mirrored into the fake vROps.
    stack.wait(lambda: len(handled_by_echo_ha(stack)) >= 10 or None, 90,
               "worker-echo-ha to echo 10 events", 2.0)
    stack.wait(lambda: mirrored_changes(stack) >= 1 or None, 60,
               "worker-vrops-ha to mirror a maintenance change into the fake vROps", 2.0)

    # 3. The crash: the primary's container killed (SIGKILL, no shutdown).
    before_handled = handled_by_echo_ha(stack)
    before_mirrored = mirrored_changes(stack)
    killed_at = time.monotonic()
    killed_wall = datetime.now().astimezone()
    stack.run("kill", "redis-primary", timeout=60)

    # 4. The Sentinels promote redis-replica (each of them says so).
    stack.wait(lambda: sentinel_master(stack) == "redis-replica" or None, 60,
               "sentinel-1 to name redis-replica the master", 0.5)
    promoted = time.monotonic() - killed_at
    for sentinel in ("sentinel-2", "sentinel-3"):
        stack.wait(lambda s=sentinel: sentinel_master(stack, s) == "redis-replica" or None, 30,
                   f"{sentinel} to name redis-replica the master", 0.5)
    assert replication(stack, "redis-replica").get("role") == "master"
    print(f"[e2e-ha] redis-primary killed; redis-replica promoted {promoted:.1f}s later")

    # 5. Handling goes on: events made after the crash echoed, maintenance mirrored again.
    def new_event_echoed() -> bool:
        return bool(set(handled_by_echo_ha(stack)) - set(before_handled))

    stack.wait(new_event_echoed, 90, "worker-echo-ha to echo an event after the failover", 1.0)
    resumed = time.monotonic() - killed_at
    stack.wait(lambda: mirrored_changes(stack) > before_mirrored or None, 60,
               "worker-vrops-ha to mirror a maintenance change after the failover", 2.0)
    print(f"[e2e-ha] handling resumed {resumed:.1f}s after the kill")

    # 6. Nothing lost: every simulator event from the producer's first start up to where it
    #    got after the failover (an event made well after the kill) echoed — the ones made
    #    while there was no master included.
    def checkpoint_after_kill() -> int | None:
        log = "\n".join(stack.logs("producer-ha").values())
        _, events = simulator_events(stack)
        later = [e.key for e in events if e.createdTime > killed_wall]
        target = checkpoint_key(log)
        return target if later and target >= min(later) + 5 else None

    target = stack.wait(checkpoint_after_kill, 60,
                        "producer-ha to commit a checkpoint past the events made after the kill",
                        2.0)
    producer_log = "\n".join(stack.logs("producer-ha").values())
    starts = producer_starts(producer_log)
    assert starts and starts[0][1].startswith("no checkpoint"), starts
    instance, events = simulator_events(stack)
    expected = {event_id(instance, e.key): e for e in events
                if e.createdTime >= starts[0][0] and e.key <= target}
    during = [e for e in expected.values() if killed_wall <= e.createdTime]
    assert during, "the driver made no event after the kill"

    def all_echoed() -> Counter | None:
        counts = handled_by_echo_ha(stack)
        return counts if set(expected) <= set(counts) else None

    try:
        counts = stack.wait(all_echoed, 60, "every event up to the checkpoint to be echoed", 2.0)
    except AssertionError:
        counts = handled_by_echo_ha(stack)
        missing = sorted(e.key for i, e in expected.items() if i not in counts)
        raise AssertionError(f"lost events (never echoed), keys: {missing}") from None
    lost = [i for i in expected if i not in counts]
    twice = {i: n for i, n in counts.items() if n > 1}
    print(f"[e2e-ha] {len(expected)} events (keys ≤ {target}, {len(during)} made after the "
          f"kill): lost {len(lost)}, echoed twice {len(twice)}")
    assert not lost
    assert not twice, f"events echoed more than once: {twice}"

    # 7. The old primary comes back as a replica of the promoted one.
    #    (Docker does not restart a container `docker kill` stopped, whatever its restart
    #    policy; one that crashed by itself it would restart: the same from here on.)
    restarted = time.monotonic()
    if service_states(stack)["redis-primary"] != "running":
        stack.run("start", "redis-primary", timeout=60)

    def rejoined() -> dict[str, str] | None:
        info = replication(stack, "redis-primary")
        return info if info.get("role") == "slave" and info.get("master_host") == \
            "redis-replica" and info.get("master_link_status") == "up" else None

    stack.wait(rejoined, 90, "the old primary to rejoin as a replica of redis-replica", 1.0)
    print(f"[e2e-ha] redis-primary back as a replica of redis-replica "
          f"{time.monotonic() - restarted:.1f}s after its start")
    assert sentinel_master(stack) == "redis-replica"
    stack.wait(lambda: int(replication(stack, "redis-replica").get("connected_slaves", 0)) >= 1
               or None, 30, "redis-replica (the master) to count its replica")
    print(f"[e2e-ha] done in {time.monotonic() - t0:.0f}s (teardown follows)")
