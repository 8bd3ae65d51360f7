"""The producer's /metrics, /stats and /healthz, served by a real producer process."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import redis
from pyVmomi import vim

from tests.support import Proc, VCenter, free_port, vebaq_argv, wait_until
from vebaq.core import deadletters

pytestmark = pytest.mark.slow


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_stats_and_health(stack_env: dict[str, str], log_dir: Path, vcenter: VCenter,
                                  redis_client: redis.Redis) -> None:
    port = free_port()
    producer = Proc("producer", vebaq_argv("producer", "--metrics-port", str(port)), stack_env,
                    log_dir)
    producer.wait_for("reading vCenter")
    base = f"http://127.0.0.1:{port}"
    deadletters.add(redis_client, task_name="VmPoweredOnEvent", pool="echo", function="echo",
                    event={"id": "x"}, error=RuntimeError("boom"), attempt=3)
    vcenter.post(vim.event.GeneralUserEvent(message="counted"))
    producer.wait_for("checkpoint at event")

    status, text = fetch(f"{base}/healthz")
    assert (status, text) == (200, "ok")
    status, text = fetch(f"{base}/metrics")
    assert status == 200
    vc = f'vcenter="{vcenter_source(stack_env)}"'
    for needle in (f'vebaq_producer_tasks_published_total{{pool="echo",{vc}}}',
                   f"vebaq_producer_events_read_total{{{vc}}}",
                   f"vebaq_producer_read_lag_seconds{{{vc}}}",
                   f"vebaq_producer_vcenter_held{{{vc}}} 1.0",
                   f"vebaq_producer_vcenter_healthy{{{vc}}} 1.0",
                   f"vebaq_producer_lag_seconds{{{vc}}}",
                   "vebaq_producer_live_producers 1.0", "vebaq_producer_lease_share 1.0",
                   'vebaq_dead_letters{pool="echo",subject="VmPoweredOnEvent"} 1.0',
                   'vebaq_queue_depth{pool="echo"}', "vebaq_retries_pending 0.0",
                   f"vebaq_producer_archived_events_total{{{vc}}} 1.0",
                   f'vebaq_archive_events{{source="{vcenter_source(stack_env)}",'
                   f'vcenter_uuid="{vcenter.instance_uuid}"}} 1.0',
                   "vebaq_archive_bytes{", "vebaq_archive_oldest_age_seconds{"):
        assert needle in text, needle
    stats = json.loads(fetch(f"{base}/stats")[1])
    assert stats["celery"]["published_per_pool"]["echo"] >= 1
    assert stats["vcenter"]["events_read"] >= 1
    mine = stats["vcenters"][vcenter_source(stack_env)]
    assert mine["held"] and mine["state"] == "ok" and mine["events_read"] >= 1
    assert mine["instance_uuid"] == vcenter.instance_uuid
    assert stats["producer"]["reading"] == [vcenter_source(stack_env)]
    assert fetch(f"{base}/healthz/strict") == (200, "ok")
    assert fetch(f"{base}/nope")[0] == 404
    wait_until(lambda: producer.stop() == 0, 30, "a clean stop")


def vcenter_source(env: dict[str, str]) -> str:
    """The CloudEvent source of the simulator's events: its SDK URL."""
    return env["VCENTER_URL"]


def test_catch_up_progress_is_logged(caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime, timedelta

    from producer.service import CatchUp

    monkeypatch.setattr("vebaq.core.progress.LOG_INTERVAL", 0.0)
    caplog.set_level("INFO", logger="vebaq.producer")
    now = datetime.now(UTC)
    tracker = CatchUp()
    tracker.update(now - timedelta(minutes=60), 1000)  # an hour behind: a backlog starts
    tracker.update(now - timedelta(minutes=30), 1000)  # half way
    tracker.update(now - timedelta(seconds=1), 500)  # caught up
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("catching up: [############------------]  50%") and
               "2000 event(s)" in line for line in lines), lines
    assert lines[-1].startswith("caught up: 2500 backlog event(s)")
