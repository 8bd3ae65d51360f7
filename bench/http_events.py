"""CloudEvents over HTTP both ways: events/s from senders through ``vebaq ingress``, Redis and an
HTTP pool to a CloudEvents receiver, against the same senders posting straight to the receiver.

Processes: the receiver (:mod:`tests.cloudevent_receiver`, the CloudEvents SDK on the standard
library's HTTP server, in its own process), ``vebaq ingress``, and :data:`WORKERS` workers of an
HTTP pool (``-P threads -c 8``) whose sink is the receiver, in binary mode. The senders are
``http_senders`` threads in this process, each with a kept-alive session, posting the simulated
event mix (about 1.5 KB of data per event), one event per request in binary mode.

Per repeat, in turn:

* **direct** (the baseline) — the senders post the events to the receiver: done when every
  request was answered;
* **ingress** — the same senders post the same number of new events to the ingress: done when
  the receiver has every one of them (the time the ingress took to answer them all, i.e. to have
  Redis hold their tasks, is recorded too);
* **ingress, batches** — the same, in batches of :data:`BATCH_SIZE` (``application/cloudevents-
  batch+json``);
* **pool alone** — the same number of tasks published straight to the pool's queue (as the
  producer does), timed until the receiver has them: what the HTTP pool itself delivers.

Each repeat checks that the receiver got every event once (``lost`` and ``duplicates`` are
recorded, and a run with either fails the section). Processes are started once; startup is not
timed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from bench import events, redisdb
from bench.procs import START_TIMEOUT, child_env, start_vebaq_worker, stop_all
from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from tests.support import Proc, vebaq_argv
from vebaq.core.broker import sender_app
from vebaq.core.config import load
from vebaq.core.publish import Publisher
from vebaq.devtools.embedded import free_port

#: Workers of the HTTP pool, and threads each (``-P threads``, the HTTP pools' default).
WORKERS = 3
WORKER_THREADS = 8

#: Events per request in the batch runs.
BATCH_SIZE = 50

#: The ingress's token (the senders' ``Authorization: Bearer``).
TOKEN = "bench-ingress-token"

#: Seconds a run may take before it is abandoned.
RUN_TIMEOUT = 300.0


def binary_request(event: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """Binary-mode headers and body, as a Knative or VEBA sender makes them."""
    headers = {f"ce-{k}": str(v) for k, v in event.items()
               if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = event.get("datacontenttype", "application/json")
    return headers, json.dumps(event.get("data")).encode()


class Senders:
    """``count`` threads posting requests, each over its own kept-alive session."""

    def __init__(self, count: int) -> None:
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="bench-sender")
        self.local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def post_all(self, url: str, bodies: list[tuple[dict[str, str], bytes]]) -> list[int]:
        """POST every ``(headers, body)``; returns the statuses."""
        def post(request: tuple[dict[str, str], bytes]) -> int:
            headers, body = request
            return self._session().post(url, data=body, headers=headers, timeout=60).status_code

        return list(self.pool.map(post, bodies))

    def close(self) -> None:
        self.pool.shutdown()


def receiver_stats(url: str) -> dict[str, int]:
    return requests.get(f"{url}/_stats", timeout=10).json()


def wait_delivered(url: str, target: int, timeout: float = RUN_TIMEOUT) -> float:
    """Wait until the receiver has ``target`` events; returns ``time.perf_counter()`` then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = receiver_stats(url)
        if stats["delivered"] >= target:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the receiver has {stats['delivered']} of {target} events after "
                               f"{timeout:.0f}s")
        time.sleep(0.01)


def fresh(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events with new ids (workers run each id once)."""
    return [{**e, "id": str(uuid.uuid4())} for e in batch]


def measure(profile: Profile, redis_url: str, log_dir: Path) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    redisdb.flush(r)
    total = profile.http_events
    mix = events.simulated_cloudevents(total)
    receiver_port, ingress_port = free_port(), free_port()
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    ingress_url = f"http://127.0.0.1:{ingress_port}/"
    config = log_dir / "http-bench.yaml"
    config.write_text(f"triggers: [{{pool: fn}}]\n"
                      f"pools: {{fn: {{sink: {{url: '{receiver_url}/', concurrency: "
                      f"{WORKER_THREADS}}}}}}}\n")
    env = child_env(redis_url, VEBAQ_CONFIG=str(config), VEBAQ_INGRESS_TOKEN=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    procs: list[Proc | None] = []
    senders = Senders(profile.http_senders)
    rates: dict[str, list[float]] = {"direct": [], "ingress": [], "ingress_batch": [],
                                     "ingress_accept": [], "pool": []}
    app = sender_app(load(environ={"VEBAQ_BROKER_URL": redis_url}), "bench-http")
    publisher = Publisher(app)
    checks: list[dict[str, int]] = []
    try:
        procs.append(Proc("http-receiver", [sys.executable, "-m", "tests.cloudevent_receiver",
                                            "--port", str(receiver_port)], env, log_dir))
        procs[-1].wait_for("receiver listening", timeout=START_TIMEOUT)
        procs.append(Proc("http-ingress", vebaq_argv("ingress", "--bind", "127.0.0.1",
                                                     "--port", str(ingress_port)), env, log_dir))
        procs[-1].wait_for("ingress listening", timeout=START_TIMEOUT)
        for i in range(WORKERS):
            procs.append(start_vebaq_worker("fn", env, log_dir, concurrency=WORKER_THREADS,
                                            implementation="threads", name=f"http-worker-{i}",
                                            node=f"fn{i}@bench"))
        # Warm-up: connections, the workers' sessions, the ingress's queue declaration.
        warm = fresh(mix[:50])
        senders.post_all(ingress_url, [({**h, **auth}, b) for h, b in map(binary_request, warm)])
        wait_delivered(receiver_url, len(warm))

        for _ in range(profile.repeats):
            before = receiver_stats(receiver_url)
            direct = [binary_request(e) for e in fresh(mix)]
            started = time.perf_counter()
            statuses = senders.post_all(receiver_url + "/", direct)
            rates["direct"].append(total / (time.perf_counter() - started))
            assert set(statuses) == {200}, f"the receiver answered {set(statuses)}"

            single = [({**h, **auth}, b) for h, b in map(binary_request, fresh(mix))]
            target = receiver_stats(receiver_url)["delivered"] + total
            started = time.perf_counter()
            statuses = senders.post_all(ingress_url, single)
            accepted = time.perf_counter()
            finished = wait_delivered(receiver_url, target)
            rates["ingress"].append(total / (finished - started))
            rates["ingress_accept"].append(total / (accepted - started))
            assert set(statuses) == {202}, f"the ingress answered {set(statuses)}"

            batch_events = fresh(mix)
            batches = [({"Content-Type": "application/cloudevents-batch+json", **auth},
                        json.dumps(batch_events[i:i + BATCH_SIZE]).encode())
                       for i in range(0, total, BATCH_SIZE)]
            target += total
            started = time.perf_counter()
            statuses = senders.post_all(ingress_url, batches)
            finished = wait_delivered(receiver_url, target)
            rates["ingress_batch"].append(total / (finished - started))
            assert set(statuses) == {202}, f"the ingress answered {set(statuses)}"

            tasks = events.outgoing(fresh(mix), "fn")
            target += total
            started = time.perf_counter()
            publisher.publish(tasks)
            finished = wait_delivered(receiver_url, target)
            rates["pool"].append(total / (finished - started))

            time.sleep(0.5)  # a duplicate would arrive now
            after = receiver_stats(receiver_url)
            sent = 4 * total
            got = after["delivered"] - before["delivered"]
            checks.append({"sent": sent, "delivered": got, "lost": sent - got,
                           "duplicates": after["repeated"] - before["repeated"]})
            if checks[-1]["lost"] or checks[-1]["duplicates"]:
                raise RuntimeError(f"events lost or duplicated: {checks[-1]}")
    finally:
        senders.close()
        app.close()
        stop_all(procs)
        redisdb.flush(r)
    return {
        "events_per_run": total, "senders": profile.http_senders, "workers": WORKERS,
        "worker_threads": WORKER_THREADS, "batch_size": BATCH_SIZE, "mode": "binary",
        "events_per_s": {name: summary(values) for name, values in rates.items()},
        "ratio_ingress_to_direct": paired_ratio(rates["ingress"], rates["direct"]),
        "ratio_ingress_batch_to_direct": paired_ratio(rates["ingress_batch"], rates["direct"]),
        "ratio_ingress_accept_to_direct": paired_ratio(rates["ingress_accept"], rates["direct"]),
        "ratio_pool_to_direct": paired_ratio(rates["pool"], rates["direct"]),
        "checks": checks,
    }
