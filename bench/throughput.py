"""Worker throughput: echo tasks/s against a bare no-op Celery task on the same broker, with
the same settings, payload and prefork concurrency (1 and 2 processes).

Per concurrency an echo worker (``python -m vebaq worker --pool echo``) and a bare worker
(``celery -A bench.bare_app worker``) run side by side, each paused (remote control
``cancel_consumer``) while the other is measured. A repeat preloads one worker's queue with
``worker_tasks`` messages, resumes it (``add_consumer``) and times from the first message taken
to the queue being empty with nothing unacked. Worker startup is thus never timed, and echo and
bare repeats alternate, so drift on a noisy machine hits both alike.

The echo function logs every event (about 40 lines each); worker output goes to a file, and that
logging is part of what is measured. Both workers also log each task's ``received`` and
``succeeded`` lines and send task events (``-E``), as ``vebaq worker`` does.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from celery import Celery

from bench import bare_app, events, redisdb
from bench.paused import PausedWorker
from bench.procs import child_env, start_celery_worker, start_vebaq_worker, stop_all
from bench.profiles import Profile
from bench.stats import paired_ratio, summary
from tests.support import Proc
from vebaq.core.messages import TaskMessage, queue_for
from vebaq.core.publish import PIPELINE_SIZE, Publisher
from workers.app import create_app

#: What a worker logs for each task that succeeded.
SUCCEEDED = r"Task \S+\[\S+\] succeeded"


def check_bare_settings(redis_url: str) -> list[str]:
    """Settings where the bare app differs from vebaq's (should be none)."""
    conf = create_app(broker_url=redis_url).conf
    return [name for name, value in bare_app.SETTINGS.items() if conf.get(name) != value]


def preload_echo(app: Celery, batch: list[dict[str, Any]]) -> None:
    """Enqueue ``batch`` for the echo pool as the producer does."""
    Publisher(app).publish(events.outgoing(batch, "echo"))


def preload_bare(app: Celery, batch: list[dict[str, Any]]) -> None:
    """Enqueue the same messages for the no-op task, with the producer's send options."""
    queue = bare_app.queue()
    with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
        for event in batch:
            app.send_task(bare_app.TASK, kwargs={"event": event, "pool": "echo"},
                          task_id=TaskMessage(event["subject"], event, bare_app.QUEUE).task_id,
                          queue=queue,
                          producer=producer)


def measure(profile: Profile, redis_url: str, log_dir: Path) -> dict[str, Any]:
    r = redisdb.connect(redis_url)
    total = profile.worker_tasks
    rounds = profile.repeats * len(profile.worker_concurrency)
    structured = events.simulated_cloudevents(total * rounds)
    batches = [structured[i * total:(i + 1) * total] for i in range(rounds)]
    echo_app, bare = create_app(broker_url=redis_url), bare_app.create_app(broker_url=redis_url)
    env = child_env(redis_url)
    results: dict[str, Any] = {"tasks_per_run": total, "message": "simulated event mix",
                               "settings_differing_from_vebaq": check_bare_settings(redis_url),
                               "by_concurrency": {}}
    for concurrency in profile.worker_concurrency:
        redisdb.flush(r)
        procs: list[Proc | None] = []
        try:
            procs.append(start_vebaq_worker("echo", env, log_dir, concurrency=concurrency,
                                            implementation="prefork",
                                            name=f"throughput-echo-c{concurrency}"))
            echo = PausedWorker("echo", procs[-1], echo_app, queue_for("echo").name,
                                f"echo@{socket.gethostname()}")
            procs.append(start_celery_worker("bench.bare_app", bare_app.QUEUE, env, log_dir,
                                             concurrency=concurrency, implementation="prefork",
                                             name=f"throughput-bare-c{concurrency}"))
            noop = PausedWorker("bare", procs[-1], bare, bare_app.QUEUE,
                                f"{bare_app.QUEUE}@{socket.gethostname()}")
            rates: dict[str, list[float]] = {"echo": [], "bare": []}
            for repeat in range(profile.repeats):
                batch = batches.pop()
                order = [(echo, preload_echo, echo_app), (noop, preload_bare, bare)]
                for worker, preload, app in order if repeat % 2 == 0 else order[::-1]:
                    preload(app, batch)
                    rates[worker.label].append(total / worker.drain(r, total).seconds)
            expected = total * profile.repeats
            for worker in (echo, noop):
                if worker.count(SUCCEEDED) != expected:
                    raise RuntimeError(f"{worker.label} worker logged {worker.count(SUCCEEDED)} "
                                       f"successes, expected {expected}")
        finally:
            stop_all(procs)
            redisdb.flush(r)
        results["by_concurrency"][str(concurrency)] = {
            "echo_tasks_per_s": summary(rates["echo"]),
            "bare_tasks_per_s": summary(rates["bare"]),
            "ratio_echo_to_bare": paired_ratio(rates["echo"], rates["bare"]),
        }
    by = results["by_concurrency"]
    if "1" in by and "2" in by:
        for kind in ("echo", "bare"):
            one, two = by["1"][f"{kind}_tasks_per_s"], by["2"][f"{kind}_tasks_per_s"]
            results[f"{kind}_scaling_1_to_2"] = two["median"] / one["median"]
    return results
