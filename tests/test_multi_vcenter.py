"""Several vCenters on real processes: three simulators (each its own process and port), real
producer processes, real Redis; events counted by CloudEvent id in the echo pool's queue, which
no worker consumes (as in test_reader_faults).

* one producer reads three vCenters; one of them is killed and restarted, or hangs: the other
  two keep their latency (event posted → enqueued, p50/p99 before and during the fault), the
  third resumes, nothing lost;
* one vCenter refuses the password: only it is degraded;
* producers share three vCenters, each read by one of them: a producer joining gets one handed
  over, the one reading two is ``kill -9``ed or stopped and the other takes them over;
* a maintenance event for same-named hosts of two vCenters marks only the right vROps resource.

Every test prints sent / enqueued / lost / duplicates per vCenter, and the figures.
"""

from __future__ import annotations

import base64
import json
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pyVmomi import vim

from producer.cloudevent import event_id
from tests import counting_functions as counting
from tests.support import (
    ROOT,
    CuttableProxy,
    Proc,
    Simulator,
    VCenter,
    build_vcsim,
    free_port,
    start_worker,
    vebaq_argv,
    wait_until,
)
from vebaq.devtools.fake_vrops import (
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    MAINTAINED,
    STARTED,
    FakeVrops,
)

pytestmark = pytest.mark.slow

#: Seconds between two events a poster sends to its vCenter.
POST_EVERY = 0.1


class Sim:
    """A simulator process on a port and with an instance UUID of its own (govmomi 0.24 gives
    every simulator the same one), which can be killed and started again there, as itself."""

    def __init__(self, binary: Path, workdir: Path, *flags: str) -> None:
        self.binary, self.workdir, self.flags = binary, workdir, flags
        self.port = free_port()
        self.instance_uuid = str(uuid.uuid4())
        self.proc: Simulator | None = None
        self.start()
        self.url = self.proc.url

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Simulator(self.binary, self.workdir, "-l", f"127.0.0.1:{self.port}",
                              "-instance-uuid", self.instance_uuid, *self.flags)

    def kill(self) -> None:
        self.proc.popen.kill()
        self.proc.popen.wait(10)

    def stop(self) -> None:
        if self.proc.popen.poll() is None:
            self.proc.stop()


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[Sim]]:
    binary = build_vcsim()
    started = [Sim(binary, tmp_path / f"vc{i}") for i in range(3)]
    for sim in started:
        vc = VCenter(sim.url)
        assert vc.instance_uuid == sim.instance_uuid
        vc.close()
    yield started
    for sim in started:
        sim.stop()


def write_config(tmp_path: Path, urls: list[str], triggers: str = "[{name: all, pool: echo}]",
                 extra: str = "") -> Path:
    path = tmp_path / "vebaq.yaml"
    entries = "".join(f"  - url: {url}\n" for url in urls)
    path.write_text(f"vcenters:\n{entries}{extra}triggers: {triggers}\n")
    return path


def env_for(stack_env: dict[str, str], config: Path, **extra: str) -> dict[str, str]:
    """The tests' environment (its VCENTER_USER/PASSWORD are every entry's defaults), with the
    vCenters from the file: VCENTER_URL would be refused next to them."""
    env = {k: v for k, v in stack_env.items() if k != "VCENTER_URL"}
    return {**env, "VEBAQ_CONFIG": str(config), "VCENTER_REQUEST_TIMEOUT": "5s", **extra}


def start_producer(env: dict[str, str], log_dir: Path, name: str, metrics_port: int = 0,
                   reading: int = 3) -> Proc:
    proc = Proc(name, vebaq_argv("producer", "--metrics-port", str(metrics_port)), env, log_dir)
    if reading:
        proc.wait_for(r"reading vCenter", timeout=90, count=reading)
    return proc


def http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def status(env: dict[str, str]) -> dict:
    """``vebaq status --json``, run as an operator would."""
    result = subprocess.run(vebaq_argv("status", "--json"), env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def readers(env: dict[str, str]) -> dict[str, str | None]:
    return {vc["url"]: vc["reader"] for vc in status(env)["vcenters"]}


class Watcher:
    """Notes when each task first appears in a pool's queue (kombu pushes new ones at the
    head; nothing consumes them), with its CloudEvent id and source."""

    def __init__(self, r: redis.Redis, queue: str = "echo") -> None:
        self.redis, self.queue = r, queue
        self.seen: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.sources: dict[str, str] = {}
        self.errors: list[str] = []
        self._taken = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self._take()
            except redis.RedisError as exc:  # said at the end, not fatal to the watch
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _take(self) -> None:
        # Counted from the tail, where the oldest is, an entry's index never changes: all but
        # the ones taken before, in one command (no race with new ones pushed at the head).
        fresh = self.redis.lrange(self.queue, 0, -(self._taken + 1))
        if not fresh:
            return
        now = time.time()
        self._taken += len(fresh)
        with self._lock:
            for raw in fresh:
                message = json.loads(raw)
                ident = message["headers"]["id"].rsplit(":", 1)[0]
                self.counts[ident] += 1
                self.seen.setdefault(ident, now)
                body = json.loads(base64.b64decode(message["body"]))
                self.sources[ident] = body[1]["event"]["source"]

    def has(self, ids: list[str]) -> bool:
        with self._lock:
            return all(i in self.seen for i in ids)

    def wait_for(self, ids: list[str], timeout: float, what: str) -> None:
        """Until every one of ``ids`` was enqueued; else fail saying how many are missing."""
        try:
            wait_until(lambda: self.has(ids), timeout, what)
        except AssertionError as exc:
            with self._lock:
                missing = [i for i in ids if i not in self.seen]
            raise AssertionError(f"{exc}: {len(missing)} of {len(ids)} missing, e.g. "
                                 f"{missing[:3]}; queue read errors: {self.errors[:2]}") from None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.errors:
            print(f"[watcher] {len(self.errors)} failed reads of the queue, e.g. {self.errors[0]}")


class Poster:
    """Posts an event to one vCenter every :data:`POST_EVERY` seconds, noting when each was
    posted (by CloudEvent id) and in which phase of the test."""

    def __init__(self, url: str, label: str) -> None:
        self.url, self.label = url, label
        self.posted: dict[str, float] = {}
        self.keys: dict[str, int] = {}
        self.phase_of: dict[str, str] = {}
        self.phase = "before"
        #: A restarted simulator numbers its events anew: the producer starts a new key epoch.
        self.key_epoch = 0
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client: VCenter | None = None
        n = 0
        while not self._stop.wait(POST_EVERY):
            if self.paused.is_set():
                if client is not None:
                    client = None  # its vCenter is gone: a new session afterwards
                continue
            try:
                client = client or VCenter(self.url)
                at = time.time()
                client.post(vim.event.GeneralUserEvent(message=f"{self.label} {n}"))
                key = client.content.eventManager.latestEvent.key
            except Exception:  # noqa: BLE001 - the vCenter went away under the poster
                client = None
                continue
            n += 1
            ident = event_id(client.instance_uuid, key, key_epoch=self.key_epoch)
            self.posted[ident], self.phase_of[ident] = at, self.phase
            self.keys[ident] = key

    def ids(self, phase: str | None = None) -> list[str]:
        return [i for i in self.posted if phase in (None, self.phase_of[i])]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def latency(poster: Poster, watcher: Watcher, phase: str) -> tuple[float, float, int]:
    """``(p50, p99, n)`` in ms of event posted → enqueued, for one phase."""
    delays = sorted((watcher.seen[i] - poster.posted[i]) * 1000 for i in poster.ids(phase)
                    if i in watcher.seen)
    if len(delays) < 2:
        return float("nan"), float("nan"), len(delays)
    return statistics.median(delays), delays[min(len(delays) - 1, int(0.99 * len(delays)))], \
        len(delays)


def report(name: str, posters: list[Poster], counts: Counter[str]) -> tuple[int, int]:
    total_lost = total_dup = 0
    for poster in posters:
        sent = poster.ids()
        lost = sum(1 for i in sent if not counts[i])
        dup = sum(counts[i] - 1 for i in sent if counts[i] > 1)
        total_lost, total_dup = total_lost + lost, total_dup + dup
        print(f"[{name}] {poster.label}: sent={len(sent)} enqueued={len(sent) - lost} "
              f"lost={lost} duplicates={dup}")
    return total_lost, total_dup


# --- one producer, three vCenters, one of them fails


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_one_vcenter_down_the_other_two_keep_their_latency(
        fault: str, sims: list[Sim], stack_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    """Killed: the third simulator is SIGKILLed, then started again on its port (a simulator
    keeps no history: its events posted before the kill and after the restart are checked).
    Hung: the producer reaches it through a proxy that stops answering (the events posted
    meanwhile wait in vCenter and must come through once it answers)."""
    proxy = CuttableProxy(("127.0.0.1", sims[2].port)) if fault == "hung" else None
    urls = [sims[0].url, sims[1].url, proxy.url(sims[2].url) if proxy else sims[2].url]
    env = env_for(stack_env, write_config(tmp_path, urls))
    port = free_port()
    producer = start_producer(env, log_dir, "producer", metrics_port=port)
    watcher = Watcher(redis_client)
    posters = [Poster(sim.url, f"vc{i}") for i, sim in enumerate(sims)]
    try:
        time.sleep(8)
        for poster in posters:
            poster.phase = "during"
        fault_at = time.time()
        if fault == "killed":
            posters[2].paused.set()
            sims[2].kill()
            producer.wait_for(rf"\[127\.0\.0\.1:{sims[2].port}\] (vCenter session lost|login "
                              rf"attempt)", timeout=60)
        else:
            proxy.hang()
            producer.wait_for(r"vCenter session lost \(TimeoutError", timeout=60)
        noticed = time.time() - fault_at
        wait_until(lambda: http(f"http://127.0.0.1:{port}/healthz/strict")[0] == 503, 60,
                   "/healthz/strict to report the vCenter")
        health = http(f"http://127.0.0.1:{port}/healthz")
        strict = http(f"http://127.0.0.1:{port}/healthz/strict")
        stats = json.loads(http(f"http://127.0.0.1:{port}/stats")[1])
        time.sleep(max(0.0, 12 - (time.time() - fault_at)))
        healthy_during = posters[0].ids("during") + posters[1].ids("during")
        watcher.wait_for(healthy_during, 30, "the healthy vCenters' events while the third is down")
        recovered_at = time.time()
        for poster in posters:
            poster.phase = "after"
        if fault == "killed":
            sims[2].start()
            posters[2].key_epoch = 1  # its event keys start again (the producer notices)
            posters[2].paused.clear()
        else:
            proxy.hang(False)
        producer.wait_for(r"vCenter session restored", timeout=90)
        time.sleep(8)
    finally:
        for poster in posters:
            poster.stop()
        if proxy is not None:
            proxy.close()
    sent = [i for poster in posters for i in poster.ids()]
    watcher.wait_for(sent, 90, "every event enqueued")
    time.sleep(1)  # anything doubled would show now
    watcher.stop()
    assert producer.stop() == 0

    name = f"3 vCenters, one {fault}"
    print(f"\n[{name}] noticed after {noticed:.1f}s (request timeout 5s); /healthz "
          f"{health[0]} {health[1].splitlines()[0]!r}; /healthz/strict {strict[0]}")
    for i, poster in enumerate(posters):
        figures = []
        for phase in ("before", "during", "after"):
            p50, p99, n = latency(poster, watcher, phase)
            figures.append(f"{phase}: p50 {p50:.0f} ms, p99 {p99:.0f} ms (n={n})")
        print(f"[{name}] vc{i}{' (the faulty one)' if i == 2 else ''} posted → enqueued: "
              + "; ".join(figures))
    assert report(name, posters, watcher.counts) == (0, 0)
    for poster, url in zip(posters, [s.url for s in sims], strict=True):
        sources = {watcher.sources[i] for i in poster.ids()}
        assert sources == {url if poster is not posters[2] else urls[2]}, sources
    # Only the faulty vCenter was reported; the process stayed healthy for the probe.
    assert health[0] == 200 and health[1].startswith("degraded: 1 of the 3 vCenter(s)"), health
    assert f"{urls[2]}: degraded: " in health[1] and f"{urls[0]}: ok" in health[1]
    assert strict[0] == 503
    assert stats["vcenters"][urls[0]]["state"] == "ok"
    assert stats["vcenters"][urls[2]]["state"].startswith("degraded")
    # The healthy vCenters' events kept flowing while the third was down.
    assert all(watcher.seen[i] < recovered_at for i in healthy_during)
    assert posters[2].ids("after") and posters[0].ids("during")


def test_a_vcenter_refusing_the_password_degrades_only_itself(
        sims: list[Sim], stack_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    guarded = Sim(build_vcsim(), tmp_path / "guarded", "-username", "vebaq", "-password",
                  "the-right-one")
    try:
        config = write_config(tmp_path, [sims[0].url, guarded.url])
        env = env_for(stack_env, config)  # VCENTER_PASSWORD is not the guarded one's
        port = free_port()
        producer = start_producer(env, log_dir, "producer", metrics_port=port, reading=1)
        producer.wait_for(r"login attempt 1 failed: vCenter .* refused the login of 'vebaq': "
                          r"wrong user name or password; retrying in 120s", timeout=60)
        vc = VCenter(sims[0].url)
        sent = [event_id(vc.instance_uuid, key) for key in _post(vc, 5)]
        vc.close()
        watcher = Watcher(redis_client)
        wait_until(lambda: watcher.has(sent), 30, "the good vCenter's events")
        watcher.stop()
        health = http(f"http://127.0.0.1:{port}/healthz")
        strict = http(f"http://127.0.0.1:{port}/healthz/strict")
        assert producer.stop() == 0
    finally:
        guarded.stop()
    print(f"\n[wrong password] /healthz {health[0]}: {health[1]!r}; /healthz/strict {strict[0]}")
    assert health[0] == 200 and strict[0] == 503
    assert f"{guarded.url}: degraded: not logged in to vCenter (LoginRefused" in health[1]
    assert f"{sims[0].url}: ok" in health[1]
    assert stack_env["VCENTER_PASSWORD"] not in producer.log()


def _post(vc: VCenter, count: int) -> list[int]:
    keys = []
    for i in range(count):
        vc.post(vim.event.GeneralUserEvent(message=f"event {i}"))
        keys.append(vc.content.eventManager.latestEvent.key)
    return keys


# --- two producers, three vCenters


def test_producers_share_three_vcenters_hand_over_and_take_over(
        sims: list[Sim], stack_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    """While events flow to three vCenters: producer A reads all three; B joins and A hands one
    over (gracefully: nothing doubled); the producer reading two is ``kill -9``ed and the other
    takes them over once their leases expire; C joins, then the producer reading two is stopped
    cleanly and the other takes its vCenters at once. Every event goes to ``echo`` (no worker:
    tasks counted by id) and to ``count`` (a counting worker: the function's runs per event)."""
    urls = [sim.url for sim in sims]
    config = write_config(tmp_path, urls, triggers="[{name: all, pool: echo}, "
                                                   "{name: counted, pool: count}]")
    env = env_for(stack_env, config, VEBAQ_FUNCTIONS="tests.counting_functions")
    worker = start_worker("count", env, log_dir, concurrency=2)
    procs = [start_producer(env, log_dir, "producer-a")]
    watcher = Watcher(redis_client)
    posters = [Poster(url, f"vc{i}") for i, url in enumerate(urls)]

    def spread() -> dict[str, list[str]] | None:
        by_reader: dict[str, list[str]] = defaultdict(list)
        for url, reader in readers(env).items():
            by_reader[reader].append(url)
        counts = sorted(len(v) for k, v in by_reader.items() if k)
        return dict(by_reader) if counts == [1, 2] else None

    def proc_of(producer_id: str) -> Proc:
        return next(p for p in procs if f":{p.popen.pid}:" in producer_id)

    def phase(name: str) -> None:
        for poster in posters:
            poster.phase = name

    def one_reader(producer_id: str) -> bool:
        return set(readers(env).values()) == {producer_id}

    try:
        phase("join")
        time.sleep(3)
        joined_at = time.monotonic()
        procs.append(start_producer(env, log_dir, "producer-b", reading=0))
        by_reader = wait_until(spread, 90, "the three vCenters spread 2 + 1", interval=0.5)
        balanced = time.monotonic() - joined_at
        time.sleep(3)
        phase("kill")
        victim_id = next(p for p, vs in by_reader.items() if len(vs) == 2)
        survivor_id = next(p for p, vs in by_reader.items() if len(vs) == 1)
        victim, survivor = proc_of(victim_id), proc_of(survivor_id)
        victim.signal(signal.SIGKILL)
        victim.popen.wait(10)
        killed_at = time.monotonic()
        wait_until(lambda: one_reader(survivor_id), 60, "the survivor to read all three",
                   interval=0.2)
        takeover = time.monotonic() - killed_at
        survivor.wait_for(r"took over reading vCenter", count=2, timeout=30)
        time.sleep(3)
        phase("rejoin")
        procs.append(start_producer(env, log_dir, "producer-c", reading=0))
        by_reader = wait_until(spread, 90, "the three vCenters spread 2 + 1 again", interval=0.5)
        time.sleep(3)
        phase("clean")
        leaving_id = next(p for p, vs in by_reader.items() if len(vs) == 2)
        staying_id = next(p for p, vs in by_reader.items() if len(vs) == 1)
        stopped_at = time.monotonic()
        assert proc_of(leaving_id).stop() == 0
        wait_until(lambda: one_reader(staying_id), 30, "the other to read all three",
                   interval=0.1)
        clean_takeover = time.monotonic() - stopped_at
        time.sleep(3)
    finally:
        for poster in posters:
            poster.stop()
    sent = [i for poster in posters for i in poster.ids()]
    watcher.wait_for(sent, 90, "every event enqueued")
    runs = wait_until(lambda: _runs_of(redis_client, sent), 90, "every event counted")
    time.sleep(1)
    watcher.stop()
    assert proc_of(staying_id).stop() == 0
    final = status(env)
    worker.stop()

    name = "producers sharing 3 vCenters"
    print(f"\n[{name}] B joined A (reading 3): spread 2 + 1 in {balanced:.1f}s (hand-over "
          f"after the batch in hand); kill -9 of the one reading 2: all three read by the "
          f"survivor {takeover:.1f}s later (lease TTL 10s); C joined, then the one reading 2 "
          f"stopped cleanly: the other read all three {clean_takeover:.1f}s later")
    for i, poster in enumerate(posters):
        figures = []
        for step in ("join", "kill", "rejoin", "clean"):
            p50, p99, n = latency(poster, watcher, step)
            figures.append(f"{step}: p50 {p50:.0f} / p99 {p99:.0f} ms (n={n})")
        print(f"[{name}] vc{i} posted → enqueued: " + "; ".join(figures))
    lost, doubled = report(name, posters, watcher.counts)
    graceful = [i for poster in posters for step in ("join", "rejoin", "clean")
                for i in poster.ids(step)]
    doubled_graceful = sum(watcher.counts[i] - 1 for i in graceful if watcher.counts[i] > 1)
    function_dup = sum(n - 1 for n in runs.values() if n > 1)
    print(f"[{name}] tasks enqueued twice: {doubled} ({doubled_graceful} of them around a "
          f"graceful hand-over; the rest a batch enqueued but not committed when kill -9 hit, "
          f"suppressed by done markers); count pool: {len(runs)} events, function runs beyond "
          f"one: {function_dup}")
    assert lost == 0 and function_dup == 0 and doubled_graceful == 0
    assert int(redis_client.get(counting.DUPLICATE_EFFECTS) or 0) == 0
    assert doubled <= 10  # at most the batches in flight at the kill
    assert [vc["reader"] for vc in final["vcenters"]] == [None] * 3  # released on a clean stop
    assert [p["id"] for p in final["producers"]] == []


def _runs_of(r: redis.Redis, ids: list[str]) -> dict[str, int] | None:
    runs = {k.decode(): int(v) for k, v in r.hgetall(counting.RUNS).items()}
    return runs if all(i in runs for i in ids) else None


# --- the vrops pool: hosts of the same name in two vCenters


def test_a_maintenance_event_touches_only_its_own_vcenters_host(
        sims: list[Sim], stack_env: dict[str, str], log_dir: Path, tmp_path: Path,
        redis_client: redis.Redis) -> None:
    """The simulators have the same inventory: host DC0_C0_H0 is ``host-…`` in both, with the
    same name and moref; only the vCenter's instance UUID (``VMEntityVCID``) tells them apart."""
    a, b = VCenter(sims[0].url), VCenter(sims[1].url)
    host_a, host_b = a.hosts()[0], b.hosts()[0]
    assert (host_a.name, host_a._moId) == (host_b.name, host_b._moId)
    name, moref = host_a.name, host_a._moId
    fake = FakeVrops([(h.name, h._moId, vc.instance_uuid) for vc in (a, b)
                      for h in vc.hosts()]).start()
    try:
        config = tmp_path / "vebaq.yaml"  # the default triggers: maintenance → vrops
        config.write_text(f"vcenters: [{{url: '{sims[0].url}'}}, {{url: '{sims[1].url}'}}]\n")
        env = env_for(stack_env, config, VROPS_URL=fake.url, VROPS_USER=DEFAULT_USERNAME,
                      VROPS_PASSWORD=DEFAULT_PASSWORD)
        worker = start_worker("vrops", env, log_dir)
        producer = start_producer(env, log_dir, "producer", reading=2)
        a.maintenance(host_a, enter=True)
        wait_until(lambda: fake.host_state(host_a._moId, a.instance_uuid) == MAINTAINED, 60,
                   "vCenter A's host maintained in vROps")
        time.sleep(2)  # would the other vCenter's same-named host follow? it must not
        states = (fake.host_state(moref, a.instance_uuid), fake.host_state(moref, b.instance_uuid))
        touched_first = [c["resource"] for c in fake.snapshot()["history"]]
        b.maintenance(host_b, enter=True)
        b.maintenance(host_b, enter=False)
        a.maintenance(host_a, enter=False)
        b.maintenance(host_b, enter=True)
        wait_until(lambda: (fake.host_state(moref, a.instance_uuid),
                            fake.host_state(moref, b.instance_uuid)) == (STARTED, MAINTAINED),
                   60, "each host in its own vCenter's latest state")
        history = fake.snapshot()["history"]
        producer.stop()
        worker.stop()
    finally:
        fake.stop()
        a.close()
        b.close()
    print(f"\n[same-named hosts] {name} ({moref}) in two vCenters: after A's "
          f"enter, A={states[0]} B={states[1]}; at the end A=STARTED B=MAINTAINED_MANUAL")
    resource_a, resource_b = (fake.resource_id(moref, vc.instance_uuid) for vc in (a, b))
    assert resource_a != resource_b
    assert states == (MAINTAINED, STARTED)
    assert touched_first == [resource_a]  # A's event changed A's host only
    assert {c["resource"] for c in history} == {resource_a, resource_b}  # and nothing else


def test_status_names_the_reader_checkpoint_and_lag(
        sims: list[Sim], stack_env: dict[str, str], log_dir: Path, tmp_path: Path) -> None:
    env = env_for(stack_env, write_config(tmp_path, [s.url for s in sims]))
    producer = start_producer(env, log_dir, "producer")
    vc = VCenter(sims[1].url)
    _post(vc, 3)
    vc.close()
    producer.wait_for(r"checkpoint at event", timeout=30)

    def checkpointed() -> dict | None:
        found = status(env)
        reported = found["producers"] and len(found["producers"][0]["reading"]) == 3
        return found if found["vcenters"][1]["checkpoint"] and reported else None

    # (A producer's record is rewritten with every heartbeat, once a second.)
    found = wait_until(checkpointed, 30, "a checkpoint and the producer's record in the status")
    text = subprocess.run(vebaq_argv("status"), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    producer.stop()
    print(f"\n[vebaq status]\n{text.stdout}")
    assert text.returncode == 0, text.stderr
    (me,) = found["producers"]
    assert f":{producer.popen.pid}:" in me["id"] and me["share"] == 3
    assert sorted(me["reading"]) == sorted(s.url for s in sims)
    for row, sim in zip(found["vcenters"], sims, strict=True):
        assert (row["url"], row["reader"], row["state"]) == (sim.url, me["id"], "ok")
        assert row["lag_seconds"] is not None and row["lag_seconds"] < 30
    assert found["vcenters"][1]["checkpoint"]["key"] > 0
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["VCENTER", "READ", "BY", "STATE", "LAG", "CHECKPOINT"]
    assert all(me["id"] in line for line in lines[1:4])
