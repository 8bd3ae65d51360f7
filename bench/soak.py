"""Chaos soak: minutes of events through the whole stack while its parts are killed.

``python -m bench.soak --minutes 20`` (``make soak``; not part of the tests) runs, on loopback
ports of its own:

* Redis as a Sentinel setup (master, replica, three Sentinels; passwords on the master and on
  the Sentinels), every vebaq process on the ``sentinel://`` URL;
* the vCenter simulator, two producers (one reads, one stands by), workers of the ``ha`` pool
  (:mod:`tests.ha_functions`: effects appended to a file, outside Redis) and of the ``vrops``
  pool against the fake vROps;
* a poster sending ``--rate`` events per second: GeneralUserEvents labelled ``soak-<n>`` (every
  10th ``flaky``: its first run fails and is retried; every 25th ``doomed``: dead-lettered), and
  every 20th a host entering or leaving maintenance mode (the ``vrops`` pool).

Meanwhile, at random times (``--seed``): ``kill -9`` of a worker (replaced at once), ``kill -9``
of a producer (restarted a few seconds later), a Redis failover (``kill -9`` of the master; the
old master restarted later as a replica) every 10 minutes, a vCenter simulator restart, and a
vROps outage (nothing listening) of :data:`VROPS_OUTAGE` seconds.

At the end posting stops, everything settles, the vROps dead letters are replayed (vROps is back
by then) and one summary is printed:

``sent``
    events the simulator confirmed (a post that failed is not counted, and gets a new label);
``handled``
    sent events some function handled (``ha``: an effect line; ``vrops``: a done marker);
``lost``
    sent events no function handled and no dead letter holds — must be 0;
``duplicate effects``
    extra effect lines of ``ha`` events (a worker killed after the effect, before its done
    marker: at-least-once delivery shows here);
``dead letters``
    ``ha``'s doomed events (expected, one each) and ``vrops`` events that outlived their retries
    during the outage (replayed at the end);
``vROps hosts not in their last state``
    hosts whose state in the fake vROps differs from the last maintenance change posted for
    them (events skipped as stale are counted too: ``vrops_stale_skips``).

The simulator keeps no event history across its restart (a real vCenter does): before
restarting it the soak stops posting until the producer has enqueued what was posted, so that
the restart tests the producer's re-login and new key epoch, not the simulator's amnesia.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis
from pyVmomi import vim

from bench.procs import child_env
from tests import ha_functions
from tests.support import (
    ROOT,
    RUNNING,
    Proc,
    SentinelCluster,
    Simulator,
    VCenter,
    build_vcsim,
    free_port,
    vebaq_argv,
    wait_until,
)
from vebaq.core import deadletters, keys
from vebaq.devtools.fake_vrops import DEFAULT_PASSWORD, DEFAULT_USERNAME, FakeVrops

#: Minutes of chaos by default.
DEFAULT_MINUTES = 20.0
#: Events posted per second by default.
DEFAULT_RATE = 8.0
#: Seconds between two worker kills (uniformly drawn).
WORKER_KILL_EVERY = (25.0, 50.0)
#: Seconds between two producer kills, and how long the killed producer stays down.
PRODUCER_KILL_EVERY = (45.0, 90.0)
PRODUCER_DOWN = (2.0, 10.0)
#: Seconds vROps is down (its pool's retries: 1 s doubling to 8 s, 5 times: about 23 s, so
#: some events outlive them and are dead-lettered).
VROPS_OUTAGE = 40.0
#: Seconds the old master stays down after a failover before it is started again.
OLD_MASTER_DOWN = 15.0
#: Seconds to wait for everything to settle once posting stopped.
SETTLE_TIMEOUT = 300.0
#: The soak's configuration: the two pools, fast retries.
CONFIG = """\
triggers:
  - {name: ha, pool: ha, filters: [{exact: {subject: GeneralUserEvent}}]}
  - name: vrops
    pool: vrops
    filters: [{any: [{exact: {subject: EnteredMaintenanceModeEvent}},
                     {exact: {subject: ExitMaintenanceModeEvent}}]}]
pools:
  ha: {retry: 4, backoffDelay: 0.5s, maxDelay: 2s}
  vrops: {retry: 5, backoffDelay: 1s, maxDelay: 8s}
"""


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Poster(threading.Thread):
    """Posts labelled events to the simulator; survives its restarts (see the module)."""

    def __init__(self, url: str, rate: float, rng: random.Random) -> None:
        super().__init__(daemon=True, name="poster")
        self.url = url
        self.interval = 1.0 / rate
        self.rng = rng
        self.sent: dict[str, str] = {}  # label → kind (plain, flaky, doomed)
        self.maintenance = 0  # maintenance-mode events confirmed
        self.maintained: dict[str, bool] = {}  # host moref → in maintenance after our last post
        self.failed_posts = 0
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.stopping = threading.Event()
        self._n = 0

    def run(self) -> None:
        client: VCenter | None = None
        while not self.stopping.is_set():
            if self.paused.is_set():
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                    client = None
                self.idle.set()
                time.sleep(0.1)
                continue
            self.idle.clear()
            try:
                if client is None:
                    client = VCenter(self.url)
                    hosts = client.hosts()
                self._post_one(client, hosts)
            except Exception as exc:  # noqa: BLE001 - a simulator restart, a hang: reconnect
                self.failed_posts += 1
                log(f"poster: {type(exc).__name__}: {exc}; reconnecting")
                client = None
                time.sleep(1)
                continue
            time.sleep(self.interval)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _post_one(self, client: VCenter, hosts: list[vim.HostSystem]) -> None:
        self._n += 1
        n = self._n
        if n % 20 == 0:
            host = self.rng.choice(hosts)
            enter = not host.runtime.inMaintenanceMode
            client.maintenance(host, enter=enter)
            self.maintenance += 1
            self.maintained[host._moId] = enter
            return
        kind = "doomed" if n % 25 == 24 else "flaky" if n % 10 == 9 else "plain"
        label = f"soak-{n}"
        client.post(vim.event.GeneralUserEvent(message=f"{label} {kind}"))
        self.sent[label] = kind


class Soak:
    """The stack, the chaos and the books (see the module docstring)."""

    def __init__(self, workdir: Path, minutes: float, rate: float, seed: int) -> None:
        self.workdir = workdir
        self.minutes = minutes
        self.rng = random.Random(seed)
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.actions: Counter[str] = Counter()
        self.failovers: list[tuple[float, float]] = []  # (promoted after, first effect after)
        log(f"starting in {workdir}")
        self.cluster = SentinelCluster(workdir / "redis", password="soak-master-pw",
                                       sentinel_password="soak-sentinel-pw")
        self.vcsim_binary = build_vcsim()
        self.vcsim_port = free_port()
        self.sim = Simulator(self.vcsim_binary, self.logs, "-l", f"127.0.0.1:{self.vcsim_port}")
        vc = VCenter(self.sim.url)
        self.instance_uuid = vc.instance_uuid
        triples = [(h.name, h._moId, vc.instance_uuid) for h in vc.hosts()]
        self.hosts = [h._moId for h in vc.hosts()]
        vc.close()
        self.vrops = FakeVrops(triples, port=free_port()).start()
        config = workdir / "vebaq.yaml"
        config.write_text(CONFIG)
        self.effects = workdir / "effects.log"
        self.env = child_env(
            self.cluster.url(), **self.cluster.env(), VEBAQ_CONFIG=str(config),
            VEBAQ_FUNCTIONS="tests.ha_functions", VEBAQ_TEST_EFFECTS=str(self.effects),
            VEBAQ_TEST_WORK="0.02", VEBAQ_VISIBILITY_TIMEOUT="15", VCENTER_URL=self.sim.url,
            VCENTER_USER="vebaq", VCENTER_PASSWORD="soak-vc-password",
            VCENTER_POLL_INTERVAL="0.5", VROPS_URL=self.vrops.url, VROPS_USER=DEFAULT_USERNAME,
            VROPS_PASSWORD=DEFAULT_PASSWORD)
        self.retired: list[Proc] = []
        self.workers: dict[str, Proc] = {}
        self.producers: dict[str, Proc | None] = {}
        self._names: Counter[str] = Counter()
        for pool, count in (("ha", 2), ("vrops", 1)):
            for _ in range(count):
                self._start_worker(pool)
        for name in ("producer-a", "producer-b"):
            self._start_producer(name)
        self.poster = Poster(self.sim.url, rate, self.rng)

    # --- processes

    def _start_worker(self, pool: str) -> None:
        self._names[pool] += 1
        name = f"{pool}-{self._names[pool]}"
        proc = Proc(name, vebaq_argv("worker", "--pool", pool, "-c", "2", "-n",
                                     f"{name}@%h"), self.env, self.logs)
        proc.wait_for(r"ready\.", timeout=120)
        self.workers[name] = proc

    def _start_producer(self, name: str) -> None:
        self._names[name] += 1
        proc = Proc(f"{name}-{self._names[name]}", vebaq_argv("producer", "--metrics-port", "0"),
                    self.env, self.logs)
        proc.wait_for(r"reading vCenter|standing by", timeout=120)
        self.producers[name] = proc

    # --- chaos

    def kill_worker(self) -> None:
        name = self.rng.choice(sorted(self.workers))
        proc = self.workers.pop(name)
        proc.kill()
        self.retired.append(proc)
        self.actions["worker kill -9"] += 1
        log(f"kill -9 worker {name}; starting a replacement")
        self._start_worker(name.split("-")[0])

    def kill_producer(self) -> str:
        name = self.rng.choice([n for n, p in self.producers.items() if p is not None])
        proc = self.producers[name]
        proc.kill()
        self.retired.append(proc)
        self.producers[name] = None
        self.actions["producer kill -9"] += 1
        log(f"kill -9 {proc.name}")
        return name

    def restart_producer(self, name: str) -> None:
        self.actions["producer restart"] += 1
        log(f"restarting {name}")
        self._start_producer(name)

    def failover(self) -> None:
        before = sum(ha_functions.runs(self.effects).values())
        old = self.cluster.kill_master()
        killed = time.monotonic()
        log(f"Redis failover: kill -9 master on port {old}")
        new = self.cluster.wait_for_failover(old, timeout=90)
        promoted = time.monotonic() - killed
        try:
            wait_until(lambda: sum(ha_functions.runs(self.effects).values()) > before + 5, 90,
                       "events handled after the failover", 0.1)
            flowing = time.monotonic() - killed
        except AssertionError:
            flowing = float("nan")
        self.failovers.append((promoted, flowing))
        self.actions["Redis failover"] += 1
        log(f"Redis failover: {old} → {new} promoted after {promoted:.1f}s, events handled "
            f"again after {flowing:.1f}s")
        self._later(OLD_MASTER_DOWN, self._restart_old_master, old)

    @staticmethod
    def _later(delay: float, action: object, *args: object) -> None:
        timer = threading.Timer(delay, action, args=args)
        timer.daemon = True  # an interrupted soak does not wait for it
        timer.start()

    def _restart_old_master(self, port: int) -> None:
        self.cluster.restart(port)
        log(f"old master on port {port} started again (the Sentinels make it a replica)")

    def restart_vcenter(self) -> None:
        self.poster.paused.set()
        self.poster.idle.wait(30)
        log("vCenter restart: posting paused until the producer enqueued what was posted")
        with contextlib.suppress(AssertionError):
            wait_until(self._posted_all_enqueued, 120, "the producer to catch up", 0.5)
        self.sim.stop()
        time.sleep(3)
        self.sim = Simulator(self.vcsim_binary, self.logs, "-l", f"127.0.0.1:{self.vcsim_port}")
        self.actions["vCenter restart"] += 1
        log("vCenter restarted (empty event history); posting again")
        self.poster.paused.clear()

    def _posted_all_enqueued(self) -> bool:
        """Every label posted so far handled, dead-lettered, or being retried, and every
        maintenance change handled or dead-lettered."""
        done = ha_functions.runs(self.effects, by_label=True)
        failed = self._failed_labels()
        letters = self._dead_letter_labels()
        vrops_done, vrops_letters = self._vrops_ids()
        return all(done[label] or label in failed or letters[label]
                   for label in list(self.poster.sent)) \
            and len(vrops_done | vrops_letters) >= self.poster.maintenance

    def vrops_outage(self) -> None:
        # Kept-alive connections would still be served by a stopped server's handler threads:
        # those are closed without an answer (``down``), new ones refused (stopped).
        self.vrops.configure(down=True)
        self.vrops.stop()
        self.actions["vROps outage"] += 1
        log(f"vROps down for {VROPS_OUTAGE:.0f}s")
        self._later(VROPS_OUTAGE, self._vrops_back)

    def _vrops_back(self) -> None:
        self.vrops.start()
        self.vrops.configure(down=False)
        log("vROps back")

    # --- the run

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds from the start, action), sorted."""
        total = self.minutes * 60
        plan: list[tuple[float, str]] = []
        at = self.rng.uniform(*WORKER_KILL_EVERY)
        while at < total - 20:
            plan.append((at, "kill_worker"))
            at += self.rng.uniform(*WORKER_KILL_EVERY)
        at = self.rng.uniform(*PRODUCER_KILL_EVERY)
        while at < total - 30:
            plan.append((at, "kill_producer"))
            at += self.rng.uniform(*PRODUCER_KILL_EVERY)
        failovers = max(1, int(self.minutes // 10))
        plan += [(total * (i + 0.4) / failovers, "failover") for i in range(failovers)]
        plan.append((total * 0.6, "restart_vcenter"))
        plan.append((total * 0.2, "vrops_outage"))
        return sorted(plan)

    def run(self) -> dict[str, object]:
        started = time.monotonic()
        self.poster.start()
        pending_restarts: list[tuple[float, str]] = []
        for at, action in self.schedule():
            while time.monotonic() - started < at:
                self._restart_due(pending_restarts)
                time.sleep(0.2)
            if action == "kill_producer":
                name = self.kill_producer()
                pending_restarts.append((time.monotonic() + self.rng.uniform(*PRODUCER_DOWN),
                                         name))
            else:
                getattr(self, action)()
            self._restart_due(pending_restarts)
        while time.monotonic() - started < self.minutes * 60:
            self._restart_due(pending_restarts)
            time.sleep(0.2)
        for _, name in pending_restarts:
            self.restart_producer(name)
        self.poster.stopping.set()
        self.poster.join(30)
        log(f"posting stopped after {time.monotonic() - started:.0f}s: settling")
        return self.settle()

    def _restart_due(self, pending: list[tuple[float, str]]) -> None:
        for item in [p for p in pending if p[0] <= time.monotonic()]:
            pending.remove(item)
            self.restart_producer(item[1])

    # --- the books

    def _redis(self) -> redis.Redis:
        return self.cluster.client()

    def _letters(self) -> list[dict]:
        with self._redis() as r:
            return deadletters.list_letters(r)

    def _dead_letter_labels(self) -> Counter[str]:
        return Counter(ha_functions.label_of(json.dumps(letter.get("event")))
                       for letter in self._letters() if letter.get("pool") == "ha")

    def _failed_labels(self) -> set[str]:
        """Labels of flaky events whose first run failed (a retry is due)."""
        path = Path(f"{self.effects}.failed")
        return set() if not path.exists() else set(re.findall(r"soak-[0-9]+", path.read_text()))

    def _vrops_ids(self) -> tuple[set[str], set[str]]:
        """Event ids of the vrops pool with a done marker, and in a dead letter."""
        with self._redis() as r:
            prefix = keys.done("vrops", "maintenance_mode", "")
            done = {k.decode()[len(prefix):] for k in r.scan_iter(f"{prefix}*", count=1000)}
        letters = {str((letter.get("event") or {}).get("id")) for letter in self._letters()
                   if letter.get("pool") == "vrops"}
        return done, letters

    def _accounted(self) -> bool:
        done = ha_functions.runs(self.effects, by_label=True)
        letters = self._dead_letter_labels()
        ha_ok = all(done[label] if kind != "doomed" else letters[label]
                    for label, kind in self.poster.sent.items())
        vrops_done, vrops_letters = self._vrops_ids()
        return ha_ok and len(vrops_done | vrops_letters) >= self.poster.maintenance

    def settle(self) -> dict[str, object]:
        try:
            wait_until(self._accounted, SETTLE_TIMEOUT, "every event handled or dead-lettered", 2)
        except AssertionError as exc:
            log(str(exc))
        time.sleep(5)  # late duplicates, if any, show now
        sent = self.poster.sent
        done = ha_functions.runs(self.effects, by_label=True)
        letters = self._dead_letter_labels()
        vrops_done, vrops_letters = self._vrops_ids()
        ha_handled = sum(1 for label, kind in sent.items() if kind != "doomed" and done[label])
        ha_lost = sorted(label for label, kind in sent.items()
                         if not (done[label] if kind != "doomed" else letters[label]))
        vrops_accounted = len(vrops_done | vrops_letters)
        vrops_lost = max(0, self.poster.maintenance - vrops_accounted)
        replayed, differing = self.replay_vrops(vrops_letters - vrops_done)
        logs = [p.log() for p in [*self.retired, *self.workers.values(),
                                  *(p for p in self.producers.values() if p)]]
        result = {
            "minutes": self.minutes,
            "sent": len(sent) + self.poster.maintenance,
            "sent_ha": len(sent), "sent_vrops": self.poster.maintenance,
            "handled": ha_handled + len(vrops_done),
            "handled_ha": ha_handled, "handled_vrops": len(vrops_done),
            "lost": len(ha_lost) + vrops_lost, "lost_labels": ha_lost[:20],
            "duplicate_effects": sum(n - 1 for label, n in done.items()
                                     if label in sent and n > 1),
            "duplicates_suppressed": sum(text.count("duplicate delivery suppressed")
                                         for text in logs),
            "dead_letters_ha_doomed": sum(letters[label] for label, kind in sent.items()
                                          if kind == "doomed"),
            "doomed": sum(1 for kind in sent.values() if kind == "doomed"),
            "flaky_retried_and_handled": sum(1 for label, kind in sent.items()
                                             if kind == "flaky" and done[label]),
            "dead_letters_vrops": len(vrops_letters),
            "vrops_replayed": replayed, "vrops_hosts_differing": differing,
            "vrops_hosts": len(self.poster.maintained),
            "vrops_stale_skips": sum(text.count(": stale, skipped") for text in logs),
            "failed_posts": self.poster.failed_posts,
            "actions": dict(self.actions),
            "failovers": [{"promoted_s": round(p, 1), "flowing_again_s": round(f, 1)}
                          for p, f in self.failovers],
            "password_in_logs": any(pw in text for text in logs
                                    for pw in ("soak-master-pw", "soak-sentinel-pw",
                                               "soak-vc-password")),
        }
        return result

    def replay_vrops(self, letters: set[str]) -> tuple[int, list[str]]:
        """Replay the vrops dead letters (vROps is back); returns how many, and the hosts whose
        state in vROps is not the one the last maintenance event posted for them said (the
        simulator forgets its hosts' states when it restarts, so the poster's own record is
        the reference)."""
        replayed = 0
        if letters:
            result = subprocess.run(vebaq_argv("dlq", "replay", "--all", "--pool", "vrops"),
                                    env=self.env, cwd=ROOT, capture_output=True, text=True,
                                    timeout=120)
            found = re.search(r"replayed (\d+)", result.stdout)
            replayed = int(found.group(1)) if found else 0
            if result.returncode != 0:
                log(f"dlq replay failed: {result.stderr.strip()}")
        expected = {m: "MAINTAINED_MANUAL" if inside else "STARTED"
                    for m, inside in self.poster.maintained.items()}

        def differing() -> list[str]:
            return sorted(m for m, state in expected.items()
                          if self.vrops.host_state(m, self.instance_uuid) != state)

        with contextlib.suppress(AssertionError):
            wait_until(lambda: not differing(), 60, "vROps to hold the hosts' last states", 1)
        return replayed, differing()

    def stop(self) -> None:
        self.poster.stopping.set()
        for proc in [*self.workers.values(), *(p for p in self.producers.values() if p)]:
            proc.stop(timeout=30)
        for proc in [*self.retired, *RUNNING]:  # RUNNING: one being started when interrupted
            with contextlib.suppress(Exception):
                proc.kill()
        self.vrops.stop()
        self.sim.stop()
        self.cluster.stop()


def summary(result: dict[str, object]) -> str:
    failovers = ", ".join(f"promoted {f['promoted_s']}s / flowing {f['flowing_again_s']}s"
                          for f in result["failovers"])
    actions = ", ".join(f"{n}× {a}" for a, n in result["actions"].items())
    return (f"soak {result['minutes']:g} min: sent={result['sent']} "
            f"(ha {result['sent_ha']}, vrops {result['sent_vrops']}) "
            f"handled={result['handled']} lost={result['lost']} "
            f"duplicate effects={result['duplicate_effects']} "
            f"duplicates suppressed={result['duplicates_suppressed']} "
            f"dead letters: ha doomed {result['dead_letters_ha_doomed']} of "
            f"{result['doomed']}, vrops {result['dead_letters_vrops']} "
            f"(replayed {result['vrops_replayed']}); vROps hosts not in their last state: "
            f"{len(result['vrops_hosts_differing'])} of {result['vrops_hosts']} "
            f"({result['vrops_stale_skips']} events skipped as stale); flaky retried and handled "
            f"{result['flaky_retried_and_handled']}; failed posts {result['failed_posts']}\n"
            f"chaos: {actions}; Redis failovers: {failovers}; "
            f"a password in the logs: {result['password_in_logs']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="events per second")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temporary "
                        "directory, removed after a run that lost nothing)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0:
        print("bench.soak: error: --minutes and --rate must be > 0", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vebaq-soak-"))
    soak = Soak(workdir, args.minutes, args.rate, args.seed)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = soak.run()
    finally:
        soak.stop()
        signal.signal(signal.SIGINT, previous)
    (workdir / "soak.json").write_text(json.dumps(result, indent=2))
    print(summary(result), flush=True)
    print(f"details: {workdir / 'soak.json'}; logs: {workdir / 'logs'}")
    ok = result["lost"] == 0 and not result["password_in_logs"]
    if ok and args.workdir is None:
        shutil.rmtree(workdir / "redis", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
