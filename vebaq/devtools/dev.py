"""``vebaq dev``: the whole pipeline in one terminal, for trying vebaq and for development.

It starts, as child processes with their output interleaved and prefixed: a broker (the
embedded one unless ``VEBAQ_BROKER_URL`` is set), the producer (reading ``VCENTER_URL``, or the
built-in simulated source), one worker per pool, Flower, and — when ``VROPS_URL`` is not set —
the fake vROps with the simulated hosts. Ctrl-C stops them all, workers warm (tasks finish).
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from vebaq.devtools.embedded import EmbeddedRedis

from producer.simulated import SIMULATED_UUID, simulated_hosts
from vebaq.core.errors import ConfigError, VebaqError
from vebaq.core.secrets import redact_url

#: Seconds children get to stop after SIGTERM before they are killed.
STOP_GRACE = 20

_COLOURS = ("cyan", "green", "yellow", "magenta", "blue", "red")


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    colour: str
    popen: subprocess.Popen | None = None
    pump: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, bufsize=1, start_new_session=True)
        self.pump = threading.Thread(target=self._copy_output, daemon=True)
        self.pump.start()

    def _copy_output(self) -> None:
        prefix = click.style(f"{self.name:>9} |", fg=self.colour)
        for line in self.popen.stdout:
            click.echo(f"{prefix} {line.rstrip()}")

    def stop(self) -> None:
        # The main process only: a Celery worker then lets its pool children finish their tasks.
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        if not self.popen:
            return
        try:
            self.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        if self.pump:
            self.pump.join(2)


def say(message: str) -> None:
    click.echo(click.style(f"{'vebaq dev':>9} | ", bold=True) + message)


def _embedded_broker() -> EmbeddedRedis:
    """The embedded broker; its fakeredis is an optional dependency (the ``dev`` extra)."""
    try:
        from vebaq.devtools.embedded import EmbeddedRedis
    except ImportError as exc:
        raise VebaqError(f"the embedded broker needs fakeredis ({exc}): pip install "
                         "'vebaq[dev]', or set VEBAQ_BROKER_URL=redis://… for a real Redis") \
            from None
    return EmbeddedRedis()


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port(option: str, port: int, host: str) -> None:
    """Refuse, in one line, a port a child would fail to open (before any child starts)."""
    if not port:
        return
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else \
                f"cannot be opened ({exc.strerror or exc})"
            raise ConfigError(f"{option} {port}: port {port} {reason}") from None


def run(pools: Iterable[str], simulate: bool | None, rate: float, flower_port: int,
        metrics_port: int) -> int:
    """Start everything, wait for Ctrl-C (or a child dying), stop everything."""
    check_port("--flower-port", flower_port, "127.0.0.1")
    check_port("--metrics-port", metrics_port, "0.0.0.0")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    embedded = None
    if env.get("VEBAQ_BROKER_URL"):
        say(f"broker: {redact_url(env['VEBAQ_BROKER_URL'])}")
    else:
        embedded = _embedded_broker().start()
        env["VEBAQ_BROKER_URL"] = embedded.url
        say(f"broker: embedded (no VEBAQ_BROKER_URL set) at {embedded.url}; demo use only — "
            f"set VEBAQ_BROKER_URL=redis://… for a real Redis")

    if simulate is None:
        simulate = not env.get("VCENTER_URL")
        if simulate:
            say("no vCenter configured (VCENTER_URL, VCENTER_USER, VCENTER_PASSWORD): using the "
                "built-in simulated event source (--simulate)")
    python = sys.executable
    producer = [python, "-m", "vebaq", "producer", "--metrics-port", str(metrics_port)]
    if simulate:
        producer += ["--simulate", "--rate", str(rate)]

    children = []
    pools = list(pools)
    if "vrops" in pools and not env.get("VROPS_URL"):
        if simulate:
            port = _free_port()
            password = secrets.token_urlsafe(12)
            hosts = [f"--host={h.name}={h.moref}@{SIMULATED_UUID}" for h in simulated_hosts(4)]
            children.append(Child("fake-vrops", [python, "-m", "vebaq.devtools.fake_vrops",
                                                 "--port", str(port), "--user", "admin",
                                                 "--password", password, *hosts], env, "red"))
            env.update(VROPS_URL=f"http://127.0.0.1:{port}", VROPS_USER="admin",
                       VROPS_PASSWORD=password)
            say(f"vROps: the fake vROps at http://127.0.0.1:{port} "
                f"(state: http://127.0.0.1:{port}/_fake/state)")
        else:
            pools.remove("vrops")
            say("VROPS_URL not set: the vrops pool is not started (its tasks wait in Redis)")
    children.append(Child("producer", producer, env, "cyan"))
    for i, pool in enumerate(pools):
        children.append(Child(pool, [python, "-m", "vebaq", "worker", "--pool", pool, "-c", "2"],
                              env, _COLOURS[(i + 1) % len(_COLOURS)]))
    flower_env = dict(env, FLOWER_UNAUTHENTICATED_API="true")
    children.append(Child("flower", [python, "-m", "celery", "-A", "workers", "flower",
                                     f"--port={flower_port}", "--address=127.0.0.1"],
                          flower_env, "magenta"))
    say(f"Flower: http://127.0.0.1:{flower_port}/tasks · producer metrics: "
        f"http://127.0.0.1:{metrics_port}/metrics · Ctrl-C stops everything")

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for child in children:
        child.start()
    status = 0
    while not stopping.wait(0.5):
        dead = [c for c in children if c.popen.poll() is not None]
        if dead:
            say(f"{dead[0].name} exited with status {dead[0].popen.returncode}; stopping")
            status = dead[0].popen.returncode or 1
            break
    say("stopping (workers finish their tasks first)…")
    for child in reversed(children):
        child.stop()
    deadline = time.monotonic() + STOP_GRACE
    for child in reversed(children):
        child.wait(deadline)
    if embedded:
        embedded.stop()
    say("stopped")
    return status
