"""Test helpers: real processes (simulator, producer, workers), their logs, and vCenter actions."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import redis
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from producer.cloudevent import event_id
from producer.reader import EventReader

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
VCSIM_SOURCE = ROOT / "tests" / "vcsim"
#: Debian's govmomi library, which the simulator is built from (GOPATH mode, offline).
GOPATH = "/usr/share/gocode"
VCSIM_PACKAGES = "golang-go golang-github-vmware-govmomi-dev golang-github-google-uuid-dev"
#: How to get the redis-server the tests start (``make test`` runs scripts/test-deps, which does).
REDIS_HINT = ("the tests start their own redis-server, and none is on PATH: run `make test` "
              "(scripts/test-deps installs it) or `sudo apt-get install redis-server`")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


#: Every process a test started; the ``_reap_processes`` fixture kills what is left of them.
RUNNING: list[Proc] = []


class Proc:
    """A child process whose stdout+stderr go to a log file the test can search."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=ROOT,
                                      start_new_session=True)
        RUNNING.append(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30, count: int = 1) -> list[str]:
        regex = re.compile(pattern)

        def found() -> list[str] | None:
            hits = regex.findall(self.log())
            if len(hits) >= count:
                return hits
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before "
                                     f"logging {pattern!r}:\n{self.log()[-3000:]}")
            return None

        return wait_until(found, timeout, f"{self.name} to log {pattern!r} x{count}")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole process group (a worker's pool children too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._log.close()

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM to the main process (as Docker's init does: a Celery worker then shuts down
        warm, its pool children finishing their tasks), SIGKILL after ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def vebaq_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vebaq", *args]


def start_worker(pool: str, env: dict[str, str], log_dir: Path, *, concurrency: int = 1,
                 name: str | None = None, extra: tuple[str, ...] = ()) -> Proc:
    proc = Proc(name or f"worker-{pool}",
                vebaq_argv("worker", "--pool", pool, "-c", str(concurrency), *extra), env, log_dir)
    proc.wait_for(r"celery@|ready\.", timeout=60)
    proc.wait_for(r"ready\.", timeout=60)
    return proc


def start_producer(env: dict[str, str], log_dir: Path, name: str = "producer") -> Proc:
    proc = Proc(name, vebaq_argv("producer", "--metrics-port", "0"), env, log_dir)
    proc.wait_for(r"reading vCenter", timeout=60)
    return proc


# --- Redis servers of the tests' own

def pings(url: str, timeout: float = 1) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=timeout) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def producer_metric(port: int, name: str) -> float:
    """A producer metric's value from its ``/metrics`` on ``port``, summed over its labels
    (every producer metric has a ``vcenter``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        values = [float(line.rsplit(" ", 1)[1]) for line in answer.read().decode().splitlines()
                  if line.startswith((name + " ", name + "{"))]
    if not values:
        raise AssertionError(f"no metric {name}")
    return sum(values)


class RedisServer:
    """A ``redis-server`` on a free loopback port, in ``workdir``, for the tests alone: never the
    machine's own Redis. ``args`` are extra server options (``--requirepass``, ``--appendonly``…);
    :meth:`kill` and :meth:`start` restart it on the same port and files."""

    def __init__(self, workdir: Path, *args: str, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_HINT)
        self.port = free_port()
        self.password = password
        workdir.mkdir(parents=True, exist_ok=True)
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                     str(workdir), "--save", "", *args]
        if password:
            self.argv += ["--requirepass", password]
        self.popen: subprocess.Popen | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20) -> None:
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL)
        wait_until(lambda: pings(self.url(), 0.5) or self.popen.poll() is not None, timeout,
                   f"redis-server on port {self.port}")
        if self.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited ({self.popen.returncode}): "
                               f"{' '.join(self.argv)}")

    def kill(self) -> None:
        """SIGKILL: a crash, only what it persisted survives."""
        self.popen.kill()
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


# --- the vCenter simulator

def build_vcsim() -> Path:
    """Build the simulator from tests/vcsim/*.go (cached in .cache/, rebuilt when any of them
    is newer); fail with the fix."""
    binary = CACHE / "vcsim-lite"
    newest = max(source.stat().st_mtime for source in VCSIM_SOURCE.glob("*.go"))
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    go = shutil.which("go")
    if go is None or not Path(GOPATH, "src/github.com/vmware/govmomi/simulator").is_dir():
        raise RuntimeError("the vCenter simulator needs Go and govmomi: apt-get install "
                           f"{VCSIM_PACKAGES} (the README's test command does this), or set "
                           "VEBAQ_VCSIM_URL to a running vcsim")
    CACHE.mkdir(exist_ok=True)
    env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off",
           "GOCACHE": str(CACHE / "go-build")}
    result = subprocess.run([go, "build", "-o", str(binary), "."], cwd=VCSIM_SOURCE, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"building the vCenter simulator failed:\n{result.stderr[-2000:]}")
    return binary


class Simulator:
    """A running vcsim-lite process (govmomi's VPX model on plain HTTP)."""

    def __init__(self, binary: Path, log_dir: Path, *args: str) -> None:
        self.log_path = log_dir / "vcsim.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.url = self.popen.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"vcsim did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)
        self._log.close()


class VCenter:
    """A pyvmomi client of the simulator, for doing things that make events."""

    def __init__(self, url: str, user: str = "tester", password: str = "tester-password") -> None:
        parts = urlsplit(url)
        # A timeout, so that a hung simulator fails the test instead of hanging the run.
        self.si = SmartConnect(protocol=parts.scheme, host=parts.hostname, port=parts.port,
                               user=user, pwd=password, disableSslCertValidation=True,
                               httpConnectionTimeout=60)
        self.content = self.si.RetrieveContent()
        self.instance_uuid = self.content.about.instanceUuid

    def inventory(self, kind: type) -> list:
        """Every managed object of ``kind`` (``vim.HostSystem``…) in the inventory, by name."""
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind],
                                                            True)
        try:
            return sorted(view.view, key=lambda entity: entity.name)
        finally:
            view.DestroyView()

    def hosts(self) -> list[vim.HostSystem]:
        return self.inventory(vim.HostSystem)

    def vms(self) -> list[vim.VirtualMachine]:
        return self.inventory(vim.VirtualMachine)

    def post(self, event: vim.event.Event) -> None:
        """Post ``event``; the simulator sets its key, chain id, time and user."""
        event.key = event.key or 0
        event.chainId = event.chainId or 0
        event.createdTime = event.createdTime or self.si.CurrentTime()
        event.userName = event.userName or "tester"
        self.content.eventManager.PostEvent(event)

    def maintenance(self, host: vim.HostSystem, enter: bool) -> None:
        """Run the real maintenance-mode task, then post the event a vCenter would emit (the
        simulator's task does not post it)."""
        task = host.EnterMaintenanceMode_Task(timeout=0) if enter else \
            host.ExitMaintenanceMode_Task(timeout=0)
        while task.info.state not in ("success", "error"):
            time.sleep(0.05)
        cls = vim.event.EnteredMaintenanceModeEvent if enter else vim.event.ExitMaintenanceModeEvent
        datacenter = self.content.rootFolder.childEntity[0]
        self.post(cls(host=vim.event.HostEventArgument(host=host, name=host.name),
                      datacenter=vim.event.DatacenterEventArgument(datacenter=datacenter,
                                                                   name=datacenter.name)))

    def close(self) -> None:
        Disconnect(self.si)


class CuttableProxy:
    """A TCP proxy on loopback whose connections the test can cut at once, as a network blip
    or a load balancer reset does: the client sees its connection drop while the server (and
    the client's session on it) lives on. :meth:`hang` makes it a black hole instead: it accepts
    connections and requests, and answers nothing, like a hung vCenter.

    :param target: ``(host, port)`` to forward to.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.cuts = 0
        self.flowing = threading.Event()
        self.flowing.set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, sdk_url: str) -> str:
        """``sdk_url`` with the proxy's address in place of the server's."""
        parts = urlsplit(sdk_url)
        return parts._replace(netloc=f"127.0.0.1:{self.port}").geturl()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.flowing.wait()  # hung: hold what came until the test lets it flow again
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(2)

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        with self._lock:
            connections, self.connections = self.connections, []
        for conn in connections:
            with contextlib.suppress(OSError):  # RST, not FIN: an abrupt drop
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # shutdown() wakes the pipe thread blocked in recv() on it; close() alone would
                # wait for that recv to return before the connection really goes.
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self.cuts += 1
        return len(connections) // 2

    def hang(self, hung: bool = True) -> None:
        """Stop (or resume) forwarding anything, in both directions."""
        if hung:
            self.flowing.clear()
        else:
            self.flowing.set()

    def close(self) -> None:
        self.flowing.set()
        self._closed = True
        self.listener.close()
        self.cut()


# --- counting what a producer enqueued (tasks wait in the echo queue: no worker reads it)

def enqueued(r: redis.Redis) -> Counter[str]:
    """Tasks waiting in the echo pool's queue, per CloudEvent id (no worker consumes them)."""
    return Counter(json.loads(raw)["headers"]["id"].rsplit(":", 1)[0]
                   for raw in r.lrange("echo", 0, -1))


def post(vcenter: VCenter, count: int, label: str) -> list[str]:
    """Post ``count`` events; returns their CloudEvent ids (each one's key from a one-event
    collector's latestPage: old simulators leave latestEvent unset)."""
    ids = []
    probe = vcenter.content.eventManager.CreateCollectorForEvents(vim.event.EventFilterSpec())
    probe.SetCollectorPageSize(1)
    try:
        for i in range(count):
            vcenter.post(vim.event.GeneralUserEvent(message=f"{label} {i}"))
            ids.append(event_id(vcenter.instance_uuid, probe.latestPage[0].key))
    finally:
        probe.DestroyCollector()
    return ids


def report(name: str, sent: list[str], r: redis.Redis) -> tuple[int, int]:
    counts = enqueued(r)
    handled = sum(1 for i in sent if counts[i])
    lost = len(sent) - handled
    duplicates = sum(counts[i] - 1 for i in sent if counts[i] > 1)
    print(f"\n[{name}] sent={len(sent)} handled={handled} lost={lost} duplicates={duplicates}")
    return lost, duplicates


def all_enqueued(r: redis.Redis, sent: list[str]) -> bool:
    counts = enqueued(r)
    return all(counts[i] for i in sent)


def drain(reader: EventReader, polls: int = 20) -> list:
    """Poll until ``polls`` polls in a row returned nothing, confirming what came."""
    read, empty = [], 0
    while empty < polls:
        batch = reader.poll()
        if not batch:
            empty += 1
            continue
        empty = 0
        read.extend(batch)
        reader.confirmed([e.key for e in batch], begin=batch[0].createdTime)
    return read


# --- Redis Sentinel: a master, replicas and Sentinels of the tests' own

class SentinelCluster:
    """A master ``redis-server``, ``replicas`` replicas of it and ``sentinels`` ``redis-sentinel``
    processes monitoring it as :attr:`MASTER`, all on free loopback ports in ``workdir``.
    Passwords go in the processes' config files, never on their command lines.

    :param down_after_ms: how long the master must not answer before a Sentinel thinks it down.
    :param password: the master's (and replicas') ``requirepass``; :param sentinel_password: the
        Sentinels' own.
    """

    MASTER = "vebaq-master"

    def __init__(self, workdir: Path, *, replicas: int = 1, sentinels: int = 3,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                 password: str | None = None, sentinel_password: str | None = None) -> None:
        for binary in ("redis-server", "redis-sentinel"):
            if shutil.which(binary) is None:
                raise RuntimeError(f"{binary} is not on PATH: apt-get install redis-server "
                                   "redis-sentinel")
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        workdir.mkdir(parents=True, exist_ok=True)
        self.servers: dict[int, subprocess.Popen | None] = {}
        self.sentinel_procs: dict[int, subprocess.Popen] = {}
        self.master_port = self._start_server(free_port())
        for _ in range(replicas):
            self._start_server(free_port(), replica_of=self.master_port)
        for _ in range(sentinels):
            self._start_sentinel(free_port())
        wait_until(lambda: all(self._sentinel_sees_replicas(p, replicas)
                               for p in self.sentinel_procs), 30,
                   "the Sentinels to know the master, its replicas and each other")

    # --- processes

    def _server_conf(self, port: int, replica_of: int | None) -> Path:
        conf = self.workdir / f"redis-{port}.conf"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.workdir}",
                 f"dbfilename dump-{port}.rdb", 'save ""', "appendonly no",
                 "repl-diskless-sync yes", "repl-diskless-sync-delay 0"]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if replica_of:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _start_server(self, port: int, replica_of: int | None = None) -> int:
        conf = self.workdir / f"redis-{port}.conf"
        if not conf.exists():
            conf = self._server_conf(port, replica_of)
        self.servers[port] = subprocess.Popen(
            [shutil.which("redis-server"), str(conf)], stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / f"redis-{port}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
        wait_until(lambda: pings(self.redis_url(port), 0.5), 20, f"redis-server on {port}")
        return port

    def _start_sentinel(self, port: int) -> None:
        conf = self.workdir / f"sentinel-{port}.conf"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.workdir}",
                 f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master_port} 2",
                 f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}",
                 f"sentinel failover-timeout {self.MASTER} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {self.MASTER} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {self.MASTER} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}",
                      f"sentinel sentinel-pass {self.sentinel_password}"]
        conf.write_text("\n".join(lines) + "\n")
        self.sentinel_procs[port] = subprocess.Popen(
            [shutil.which("redis-sentinel"), str(conf)], stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / f"sentinel-{port}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT)

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.sentinel_password,
                           socket_timeout=2, socket_connect_timeout=1, decode_responses=True)

    def _sentinel_sees_replicas(self, port: int, replicas: int) -> bool:
        try:
            with self._sentinel(port) as s:
                master = s.sentinel_master(self.MASTER)
                return (int(master.get("num-slaves", 0)) >= replicas
                        and int(master.get("num-other-sentinels", 0))
                        >= len(self.sentinel_procs) - 1)
        except redis.RedisError:
            return False

    # --- addresses

    def redis_url(self, port: int, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{port}/{db}"

    def url(self, db: int = 0) -> str:
        """The ``sentinel://`` broker URL of every Sentinel (the master's password in the first
        alternative, as kombu reads it)."""
        auth = f":{self.password}@" if self.password else ""
        parts = [f"sentinel://{auth if i == 0 else ''}127.0.0.1:{port}"
                 for i, port in enumerate(self.sentinel_procs)]
        return ";".join(parts) + f"/{db}"

    def env(self) -> dict[str, str]:
        """What vebaq's processes need besides :meth:`url` (the Sentinel password by env)."""
        env = {"VEBAQ_BROKER_MASTER_NAME": self.MASTER}
        if self.sentinel_password:
            env["VEBAQ_SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    def master(self) -> int:
        """The port the Sentinels name as master now (a majority of them)."""
        votes: Counter[int] = Counter()
        for port in self.sentinel_procs:
            try:
                with self._sentinel(port) as s:
                    votes[int(s.sentinel_get_master_addr_by_name(self.MASTER)[1])] += 1
            except (redis.RedisError, TypeError):
                continue
        return votes.most_common(1)[0][0] if votes else 0

    def client(self, db: int = 0) -> redis.Redis:
        """A client of the master, wherever it is now (redis-py's Sentinel support)."""
        from redis.sentinel import Sentinel

        sentinel = Sentinel([("127.0.0.1", p) for p in self.sentinel_procs],
                            sentinel_kwargs={"password": self.sentinel_password,
                                             "socket_timeout": 2},
                            socket_timeout=5, socket_connect_timeout=2)
        return sentinel.master_for(self.MASTER, db=db, password=self.password)

    # --- faults

    def kill_master(self) -> int:
        """``kill -9`` the current master; returns its port."""
        port = self.master()
        proc = self.servers[port]
        proc.kill()
        proc.wait(10)
        self.servers[port] = None
        return port

    def wait_for_failover(self, old: int, timeout: float = 60) -> int:
        """Wait until the Sentinels name a new master and it takes writes; returns its port."""
        def promoted() -> int:
            port = self.master()
            if port and port != old:
                try:
                    with redis.Redis.from_url(self.redis_url(port), socket_timeout=1) as r:
                        if r.info("replication").get("role") == "master":
                            return port
                except redis.RedisError:
                    return 0
            return 0
        return wait_until(promoted, timeout, "Sentinel to promote a replica", 0.05)

    def restart(self, port: int) -> None:
        """Start a killed server again (the Sentinels make it a replica of the new master)."""
        self._start_server(port)

    def stop(self) -> None:
        for proc in [*self.sentinel_procs.values(), *self.servers.values()]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.sentinel_procs.values(), *self.servers.values()]:
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
