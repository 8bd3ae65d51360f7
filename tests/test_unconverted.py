"""Events the producer cannot convert are dead-lettered replayably: ``vebaq dlq replay``
converts them again (after the fix) and enqueues them where today's triggers route them.

The producer reads a real event from the vCenter simulator with a converter that fails for it
(the one stand-in here: a converter bug, which the real converter does not have); the replay is
the real ``vebaq dlq replay`` command with the real converter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from pyVmomi import vim

import producer.service
from producer import unconverted
from producer.cloudevent import event_id, to_cloudevent
from producer.service import ProducerService
from tests import flaky_functions as flaky
from tests.support import ROOT, VCenter, wait_until
from vebaq.core import config, deadletters
from vebaq.core.envelope import to_structured


def vebaq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vebaq", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def service(stack_env: dict[str, str]) -> Iterator[ProducerService]:
    """A producer reading the simulator, started (logged in, collector open), lease held."""
    settings = config.check_pools(config.load(environ=stack_env), {"echo", "vrops"})
    service = ProducerService(settings)
    service.check_broker()
    assert service.lease.try_acquire()
    service.start()
    yield service
    service.shutdown()
    service.lease.release()


def read_until(service: ProducerService, wanted: Any) -> list[vim.event.Event]:
    """Poll until an event ``wanted`` accepts was read; returns every event read meanwhile."""
    read: list[vim.event.Event] = []

    def found() -> bool:
        read.extend(service.reader.poll())
        return any(wanted(event) for event in read)

    wait_until(found, 30, "the posted event to be read", 0.2)
    return read


def test_an_event_the_producer_could_not_convert_is_converted_again_by_a_replay(
        service: ProducerService, vcenter: VCenter, stack_env: dict[str, str],
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    host = vcenter.hosts()[0]

    def ours(event: vim.event.Event) -> bool:
        return isinstance(event, vim.event.EnteredMaintenanceModeEvent) and \
            event.host.name == host.name

    def buggy(event: vim.event.Event, **options: Any) -> Any:
        if ours(event):
            raise TypeError("cannot convert field 'host' (a converter bug)")
        return to_cloudevent(event, **options)

    monkeypatch.setattr(producer.service, "to_cloudevent", buggy)
    service.reader.poll()  # what came before
    vcenter.maintenance(host, enter=True)  # routed to echo and vrops by the default triggers
    try:
        events = read_until(service, ours)
    finally:
        vcenter.maintenance(host, enter=False)
    service._convert(events)
    [original] = [event for event in events if ours(event)]
    expected = to_structured(to_cloudevent(
        original, source=service.session.url, instance_uuid=service.session.instance_uuid,
        api_version=service.session.api_version))

    [letter] = deadletters.list_letters(redis_client)
    kept = letter["event"]
    print(f"\n[unconverted event] dead letter {letter['id']}: {letter['exception']}: "
          f"{letter['error']}; kept {len(kept['soap']):,} characters of SOAP XML")
    assert (letter["function"], letter["pool"], letter["task"]) == (
        "producer", None, "EnteredMaintenanceModeEvent")
    assert kept["key"] == original.key and kept["instanceUuid"] == vcenter.instance_uuid

    # The fix is deployed; the operator replays the dead letter.
    result = vebaq(stack_env, "dlq", "replay", letter["id"])
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"replayed 1 dead letter ({letter['id']}): converted again, sent to " \
                            "echo, vrops\n"
    for pool in ("echo", "vrops"):
        [message] = [m for m in flaky.queued(redis_client, pool)
                     if m["kwargs"]["event"]["id"] == expected["id"]]
        assert message["kwargs"]["event"] == expected  # the event, as if it had never failed
        assert message["headers"]["id"].startswith(f"{expected['id']}:{pool}:replay-")
    assert expected["id"] == event_id(vcenter.instance_uuid, original.key)
    assert expected["data"]["Host"]["Host"] == {"Type": "HostSystem", "Value": host._moId}
    assert deadletters.depth(redis_client) == 0


def test_a_dead_letter_that_cannot_be_converted_again_stays(
        stack_env: dict[str, str], redis_client: redis.Redis) -> None:
    def add(event: dict[str, Any]) -> str:
        return deadletters.add(redis_client, task_name="GeneralUserEvent", pool=None,
                               function="producer", event=event,
                               error=ValueError("cannot convert"), attempt=1)

    origin = {"source": "https://vc/sdk", "instance_uuid": "uuid-1", "api_version": "8.0.3",
              "key_epoch": 0}
    incomplete = unconverted.dead_letter_event(  # a required field missing
        vim.event.GeneralUserEvent(key=7, chainId=7, message="no time"), **origin)
    damaged = unconverted.dead_letter_event(vim.event.GeneralUserEvent(
        key=7, chainId=7, createdTime=datetime.now(UTC), userName="u", message="x"), **origin)
    damaged["soap"] = damaged["soap"][:40]
    cases = {add(incomplete): "pyvmomi cannot serialize it (TypeError: Field \"createdTime\" "
                              "is not optional)",
             add(damaged): "its SOAP XML does not parse",
             add({"vcenter": "https://vc/sdk", "raw": "(…)"}): "keeps no SOAP XML of the event"}
    for letter, reason in cases.items():
        result = vebaq(stack_env, "dlq", "replay", letter)
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert len(lines) == 1 and lines[0].startswith(f"vebaq: error: dead letter {letter}: ")
        assert reason in lines[0], lines[0]
    assert "no time" in incomplete["raw"]  # kept as text for `dlq show`
    assert deadletters.depth(redis_client) == 3  # all kept
    result = vebaq(stack_env, "dlq", "replay", "--all")
    assert result.stdout == "replayed 0 dead letter(s), skipped 3\n"
