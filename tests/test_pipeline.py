"""End to end on real parts: the vCenter simulator → producer process → Redis → echo worker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pyVmomi import vim

from producer.cloudevent import event_id
from tests.support import Proc, VCenter, start_producer, start_worker, wait_until

pytestmark = pytest.mark.slow


def echoed_ids(log: str, subject: str) -> list[str]:
    """CloudEvent ids the echo function printed for ``subject``."""
    ids = []
    for block in log.split("CloudEvent ")[1:]:
        if block.startswith(subject + "\n"):
            match = re.search(r"^  id: (\S+)$", block, re.M)
            if match:
                ids.append(match.group(1))
    return ids


def wait_checkpoint(producer: Proc, key: int, timeout: float = 30) -> None:
    """Wait until the producer's checkpoint reached event ``key``."""
    def reached() -> bool:
        done = [int(k) for k in re.findall(r"checkpoint at event (\d+)", producer.log())]
        return bool(done) and max(done) >= key
    wait_until(reached, timeout, f"{producer.name}'s checkpoint to reach event {key}")


def latest_key(vcenter: VCenter) -> int:
    collector = vcenter.content.eventManager.CreateCollectorForEvents(vim.event.EventFilterSpec())
    try:
        collector.SetCollectorPageSize(1000)
        return max(e.key for e in collector.latestPage)
    finally:
        collector.DestroyCollector()


def test_vcenter_events_come_out_of_the_echo_pool(stack_env: dict[str, str], log_dir: Path,
                                                  vcenter: VCenter) -> None:
    worker = start_worker("echo", stack_env, log_dir)
    producer = start_producer(stack_env, log_dir)
    host = vcenter.hosts()[0]

    vcenter.maintenance(host, enter=True)  # a real EnterMaintenanceMode_Task + its event
    enter_key = latest_key(vcenter)
    vcenter.post(vim.event.EventEx(eventTypeId="com.example.vebaq.NeverSeenBefore",
                                   severity="info", message="custom ✓"))
    custom_key = latest_key(vcenter)
    vcenter.maintenance(host, enter=False)

    worker.wait_for(r"Task ExitMaintenanceModeEvent\[\S+\] succeeded", timeout=30)
    worker.wait_for(r"Task com\.example\.vebaq\.NeverSeenBefore\[\S+\] succeeded", timeout=30)
    log = worker.log()
    assert "unregistered task" not in log.lower()

    # Attributes and data, both printed.
    enter_id = event_id(vcenter.instance_uuid, enter_key)
    assert echoed_ids(log, "EnteredMaintenanceModeEvent") == [enter_id]
    block = log.split("CloudEvent EnteredMaintenanceModeEvent\n", 1)[1].split("succeeded", 1)[0]
    for line in (f"  id: {enter_id}", f"  source: {stack_env['VCENTER_URL']}",
                 "  type: com.vmware.event.router/event",
                 "  subject: EnteredMaintenanceModeEvent", "  eventclass: event",
                 f"  vcenteruuid: {vcenter.instance_uuid}", "  data:"):
        assert line in block
    assert f'"Key": {enter_key}' in block
    assert f'"Value": "{host._moId}"' in block and '"Type": "HostSystem"' in block
    assert f'"Name": "{host.name}"' in block

    custom = log.split("CloudEvent com.example.vebaq.NeverSeenBefore\n", 1)[1]
    assert "  type: com.vmware.event.router/eventex" in custom
    assert f"  id: {event_id(vcenter.instance_uuid, custom_key)}" in custom
    assert '"Message": "custom \\u2713"' in custom or '"Message": "custom ✓"' in custom

    # The task is named after the subject, and the producer never logged the password.
    assert re.search(r"Task EnteredMaintenanceModeEvent\[" + enter_id + r":echo\] succeeded", log)
    producer.stop()
    assert producer.popen.returncode == 0
    for proc in (producer, worker):
        assert stack_env["VCENTER_PASSWORD"] not in proc.log()
    worker.stop()


def test_restart_resumes_from_the_checkpoint_without_loss_or_duplicates(
        stack_env: dict[str, str], log_dir: Path, vcenter: VCenter) -> None:
    producer = start_producer(stack_env, log_dir, name="producer-1")
    posted = []
    for i in range(5):
        vcenter.post(vim.event.GeneralUserEvent(message=f"before restart {i}"))
        posted.append(latest_key(vcenter))
    wait_checkpoint(producer, posted[-1])
    assert producer.stop() == 0  # SIGTERM: finishes the batch, exits cleanly

    for i in range(5):  # while the producer is down
        vcenter.post(vim.event.GeneralUserEvent(message=f"while down {i}"))
        posted.append(latest_key(vcenter))
    producer = start_producer(stack_env, log_dir, name="producer-2")
    assert "checkpoint: event" in producer.log()
    wait_checkpoint(producer, posted[-1])

    # The worker starts only now: every task waited in Redis, none was lost.
    worker = start_worker("echo", stack_env, log_dir)
    expected = sorted(event_id(vcenter.instance_uuid, key) for key in posted)
    wait_until(lambda: len(set(echoed_ids(worker.log(), "GeneralUserEvent")) & set(expected))
               == len(expected), 30, "all ten events echoed")
    seen = echoed_ids(worker.log(), "GeneralUserEvent")
    assert sorted(e for e in seen if e in expected) == expected  # each exactly once
    producer.stop()
    worker.stop()


def test_producer_logs_in_again_after_its_session_is_killed(
        stack_env: dict[str, str], log_dir: Path, vcenter: VCenter) -> None:
    producer = start_producer(stack_env, log_dir)
    worker = start_worker("echo", stack_env, log_dir)
    vcenter.post(vim.event.GeneralUserEvent(message="before the session loss"))
    producer.wait_for(r"checkpoint at event", timeout=30)

    manager = vcenter.content.sessionManager
    own = manager.currentSession.key
    others = [s.key for s in manager.sessionList if s.key != own]
    assert others, "the producer's session should be listed"
    manager.TerminateSession(others)

    producer.wait_for(r"vCenter session restored", timeout=60)
    vcenter.post(vim.event.GeneralUserEvent(message="after the session loss"))
    key = latest_key(vcenter)
    wait_until(lambda: event_id(vcenter.instance_uuid, key) in
               echoed_ids(worker.log(), "GeneralUserEvent"), 30, "the event after re-login")
    producer.stop()
    worker.stop()
