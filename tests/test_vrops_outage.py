"""vROps down for a while (connection refused, then 503s): retries with back-off, dead letters
after the limit, and a replay after recovery converges every host to vCenter's state."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.support import ROOT, VCenter, free_port, start_producer, start_worker, wait_until
from vebaq.core import deadletters, retrystore
from vebaq.devtools.fake_vrops import DEFAULT_PASSWORD, DEFAULT_USERNAME, FakeVrops

pytestmark = pytest.mark.slow


def replay_all(env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-m", "vebaq", "dlq", "replay", "--all"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_vrops_outage_dead_letters_then_replay_converges(stack_env: dict[str, str],
                                                         log_dir: Path, vcenter: VCenter,
                                                         redis_client: redis.Redis,
                                                         tmp_path: Path) -> None:
    hosts = vcenter.hosts()[:3]
    port = free_port()
    triples = [(h.name, h._moId, vcenter.instance_uuid) for h in hosts]
    config = tmp_path / "vebaq.yaml"
    config.write_text("pools:\n  vrops: {retry: 3, backoffDelay: 200ms, maxDelay: 500ms}\n")
    env = {**stack_env, "VEBAQ_CONFIG": str(config), "VROPS_URL": f"http://127.0.0.1:{port}",
           "VROPS_USER": DEFAULT_USERNAME, "VROPS_PASSWORD": DEFAULT_PASSWORD}
    worker = start_worker("vrops", env, log_dir, concurrency=2)
    producer = start_producer(env, log_dir)

    # vROps is down (nothing listens): every maintenance event is retried, then dead-lettered.
    changes = 0
    for host in hosts:
        for _ in range(2):
            vcenter.maintenance(host, enter=not host.runtime.inMaintenanceMode)
            changes += 1
    wait_until(lambda: deadletters.depth(redis_client) == changes, 60,
               f"all {changes} events dead-lettered after their retries", 0.3)
    letters = deadletters.list_letters(redis_client, pool="vrops")
    assert {letter["attempts"] for letter in letters} == {4}  # 1 try + 3 retries
    assert all("VropsUnavailable" in letter["exception"] for letter in letters), letters[0]
    assert all(letter.get("knativeerrordest", "").startswith(env["VROPS_URL"])
               for letter in letters), letters[0]
    retry_lines = len(re.findall(r"WARNING.*failed \(attempt [123] of 4\), retry", worker.log()))
    assert retry_lines >= 3 * changes

    # vROps comes back answering 503: the replay fails again and lands in the dead letters.
    fake = FakeVrops(triples, port=port, fail_rate=1.0, seed=1).start()
    try:
        replay_all(env)
        wait_until(lambda: deadletters.depth(redis_client) == changes
                   and retrystore.pending(redis_client) == 0, 60,
                   "the replayed events dead-lettered again while vROps answers 503", 0.3)
        assert fake.injected["5xx"] >= changes

        # vROps recovers: one more replay converges every host to vCenter's latest state.
        fake.configure(fail_rate=0.0)
        output = replay_all(env)
        assert f"replayed {changes}" in output, output
        expected = {h._moId: "MAINTAINED_MANUAL" if h.runtime.inMaintenanceMode else "STARTED"
                    for h in hosts}
        wait_until(lambda: {m: fake.host_state(m, vcenter.instance_uuid) for m in expected}
                   == expected and deadletters.depth(redis_client) == 0, 60,
                   "every host in vCenter's state after the replay", 0.3)
        print(f"\n[vROps outage] {changes} events: dead-lettered after 4 attempts while down, "
              f"again while answering 503, replayed after recovery: all {len(hosts)} hosts "
              f"converged; {retry_lines} retries logged; vROps calls: {dict(fake.calls)}")
    finally:
        fake.stop()
        producer.stop()
        worker.stop()
