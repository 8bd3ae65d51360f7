"""The ``vrops`` pool's function against the fake vROps and the tests' real Redis.

Includes the issue's proof: 50 hosts, random enter/exit sequences, events reordered and processed
by 4 threads with 20% injected 5xx and retries; vROps ends in every host's latest vCenter state.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import redis
from cloudevents.core.v1.event import CloudEvent
from pyVmomi import vim

import workers.settings
from producer.cloudevent import to_cloudevent
from vebaq.core.envelope import from_structured, to_structured
from vebaq.devtools.fake_vrops import MAINTAINED, STARTED, FakeVrops
from workers.errors import PermanentError
from workers.functions import vrops
from workers.pools import POOLS
from workers.vrops_client import VropsRejected, VropsUnavailable

PASSWORD = "fn-test-pw-9x"
VC_A = "3c9bd3f0-71a4-4d43-93d9-a1b2c3d4e5f6"
VC_B = "7e1f0a22-5b3c-4c8d-8e9f-0a1b2c3d4e5f"
T0 = datetime(2024, 5, 6, 16, 20, 5, tzinfo=UTC)


@pytest.fixture
def r(redis_url, monkeypatch):
    """The tests' Redis (a flushed database), also the broker the function's settings name."""
    monkeypatch.setenv("VEBAQ_BROKER_URL", redis_url)
    client = redis.Redis.from_url(redis_url)
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake(r, monkeypatch):
    hosts = [("esx01", "host-19", VC_A), ("esx01", "host-19", VC_B), ("esx02", "host-20", VC_A)]
    with FakeVrops(hosts, username="admin", password=PASSWORD) as server:
        configure(monkeypatch, server.url)
        yield server
    workers.settings.settings.cache_clear()
    vrops.reset_clients()


def configure(monkeypatch, url: str | None) -> None:
    for name in ("VEBAQ_CONFIG", "VEBAQ_FUNCTIONS", "vropsFqdn", "vropsUser", "vropsPassword"):
        monkeypatch.delenv(name, raising=False)
    if url:
        monkeypatch.setenv("VROPS_URL", url)
    else:
        monkeypatch.delenv("VROPS_URL", raising=False)
    monkeypatch.setenv("VROPS_USER", "admin")
    monkeypatch.setenv("VROPS_PASSWORD", PASSWORD)
    workers.settings.settings.cache_clear()
    vrops.reset_clients()


def event(subject: str, name: str, moref: str, vc: str, key: int, at: datetime,
          **attributes) -> CloudEvent:
    """A CloudEvent shaped like the producer's (``to_cloudevent``)."""
    data = {"Key": key, "ChainId": key, "CreatedTime": at.isoformat(), "UserName": "vsphere",
            "Host": {"Name": name, "Host": {"Type": "HostSystem", "Value": moref}},
            "FullFormattedMessage": f"Host {name} in DC {subject}"}
    base = {"id": f"{vc}/{key}", "source": "https://vcenter.lab/sdk",
            "type": "com.vmware.event.router/event", "subject": subject,
            "datacontenttype": "application/json", "time": at, "vcenteruuid": vc}
    base.update(attributes)
    return CloudEvent({k: v for k, v in base.items() if v is not None}, data)


def enter(name: str, moref: str, vc: str, key: int, at: datetime, **kw) -> CloudEvent:
    return event("EnteredMaintenanceModeEvent", name, moref, vc, key, at, **kw)


def leave(name: str, moref: str, vc: str, key: int, at: datetime, **kw) -> CloudEvent:
    return event("ExitMaintenanceModeEvent", name, moref, vc, key, at, **kw)


def run(ce: CloudEvent) -> str:
    """Call the function the way the worker does: through the pool registry."""
    [fn] = [f for f in POOLS["vrops"] if f.handles(ce.get_subject())]
    return fn.handler(ce)


def test_registered_for_the_maintenance_subjects():
    names = {f.name: f for f in POOLS["vrops"]}
    assert names["maintenance_mode"].subjects == {"EnteredMaintenanceModeEvent",
                                                  "ExitMaintenanceModeEvent"}
    assert names["maintenance_mode"].handler is vrops.maintenance_mode


def test_enter_then_exit(fake, r):
    assert run(enter("esx01", "host-19", VC_A, 100, T0)) == vrops.APPLIED
    assert fake.host_state("host-19", VC_A) == MAINTAINED
    assert fake.host_state("host-19", VC_B) == STARTED  # same name and moref, other vCenter
    assert run(leave("esx01", "host-19", VC_A, 101, T0 + timedelta(minutes=5))) == vrops.APPLIED
    assert fake.host_state("host-19", VC_A) == STARTED
    assert [c.method for c in fake.history] == ["PUT", "DELETE"]
    record = vrops.applied(r, VC_A, "host-19")
    assert (record["key"], record["maintained"], record["subject"]) == \
        ("101", "0", "ExitMaintenanceModeEvent")
    assert r.exists(f"vebaq:vrops:applied:{VC_A}:host-19")
    assert fake.calls["token_acquire"] == 1 and fake.calls["resource_query"] == 1


def test_stale_event_is_skipped(fake, caplog):
    caplog.set_level("INFO", logger="vebaq.vrops")
    assert run(leave("esx01", "host-19", VC_A, 101, T0 + timedelta(seconds=30))) == vrops.APPLIED
    fake.reset_calls()
    assert run(enter("esx01", "host-19", VC_A, 100, T0)) == vrops.STALE  # a late retry
    assert fake.host_state("host-19", VC_A) == STARTED
    assert fake.total_calls() == 0
    assert "stale, skipped" in caplog.text


def test_same_time_is_ordered_by_key(fake):
    assert run(leave("esx02", "host-20", VC_A, 201, T0)) == vrops.APPLIED
    assert run(enter("esx02", "host-20", VC_A, 200, T0)) == vrops.STALE
    assert run(enter("esx02", "host-20", VC_A, 202, T0)) == vrops.APPLIED
    assert fake.host_state("host-20", VC_A) == MAINTAINED


def test_duplicate_causes_no_second_call(fake):
    ce = enter("esx01", "host-19", VC_B, 7, T0)
    assert run(ce) == vrops.APPLIED
    calls = fake.total_calls()
    assert run(ce) == vrops.DUPLICATE
    assert fake.total_calls() == calls
    assert [c.method for c in fake.history] == ["PUT"]


def test_failed_call_is_not_recorded_and_the_retry_applies(fake, r):
    fake.configure(fail_next=3)  # token, lookup, PUT all get their turn to fail
    ce = enter("esx01", "host-19", VC_A, 100, T0)
    for _ in range(3):
        with pytest.raises(VropsUnavailable):
            run(ce)
        assert vrops.applied(r, VC_A, "host-19") == {}
    assert run(ce) == vrops.APPLIED
    assert fake.host_state("host-19", VC_A) == MAINTAINED
    assert not r.exists(f"vebaq:vrops:lock:{VC_A}:host-19")  # released on failure too


def test_unknown_host_is_permanent(fake):
    with pytest.raises(VropsRejected, match="host-77"):
        run(enter("esx77", "host-77", VC_A, 1, T0))


def test_malformed_events_are_permanent(fake):
    with pytest.raises(PermanentError, match="vcenteruuid"):
        run(enter("esx01", "host-19", None, 1, T0))
    no_host = CloudEvent({"id": "1", "source": "s", "type": "t", "vcenteruuid": VC_A,
                          "subject": "EnteredMaintenanceModeEvent"}, {"Key": 1, "Host": None})
    with pytest.raises(PermanentError, match="names no host"):
        run(no_host)
    assert fake.total_calls() == 0


def test_missing_vrops_url_says_what_to_set(r, monkeypatch):
    configure(monkeypatch, None)
    try:
        with pytest.raises(PermanentError, match="VROPS_URL"):
            run(enter("esx01", "host-19", VC_A, 1, T0))
    finally:
        workers.settings.settings.cache_clear()


def vcenter_event(cls: type, key: int, at: datetime, key_epoch: int = 0) -> CloudEvent:
    """A maintenance event of esx01 (host-19) of VC_A the producer's way: pyvmomi event →
    ``to_cloudevent`` → structured JSON (what the task carries) → parsed as the worker does."""
    ev = cls(key=key, chainId=key, createdTime=at, userName="vsphere",
             host=vim.event.HostEventArgument(name="esx01", host=vim.HostSystem("host-19")))
    ce = to_cloudevent(ev, source="https://vcenter.lab/sdk", instance_uuid=VC_A,
                       api_version="8.0.3", key_epoch=key_epoch)
    return from_structured(json.dumps(to_structured(ce, json_data=True)))


def test_a_renumbered_vcenter_s_lower_keys_win_and_the_old_epoch_is_stale(fake, r, caplog):
    """vCenter restored from a backup numbers its events anew (the producer starts key epoch 1):
    its Exit at key 3 must override the Enter at key 500 of epoch 0, even with vCenter's clock
    put back by the restore; a late retry of epoch 0 (key 600) is then stale."""
    caplog.set_level("INFO", logger="vebaq.vrops")
    Enter, Exit = vim.event.EnteredMaintenanceModeEvent, vim.event.ExitMaintenanceModeEvent
    assert run(vcenter_event(Enter, 500, T0)) == vrops.APPLIED
    assert fake.host_state("host-19", VC_A) == MAINTAINED
    assert [c.method for c in fake.history] == ["PUT"]
    restored = vcenter_event(Exit, 3, T0 - timedelta(hours=1), key_epoch=1)
    assert restored.get_extension("vcenterkeyepoch") == 1
    assert run(restored) == vrops.APPLIED
    assert fake.host_state("host-19", VC_A) == STARTED
    assert [c.method for c in fake.history] == ["PUT", "DELETE"]
    record = vrops.applied(r, VC_A, "host-19")
    assert (record["key_epoch"], record["key"], record["maintained"]) == ("1", "3", "0")

    fake.reset_calls()
    assert run(vcenter_event(Enter, 600, T0 + timedelta(minutes=1))) == vrops.STALE
    assert fake.host_state("host-19", VC_A) == STARTED
    assert fake.total_calls() == 0
    assert "stale, skipped" in caplog.text
    assert run(restored) == vrops.DUPLICATE
    assert run(vcenter_event(Enter, 4, T0 - timedelta(minutes=59), key_epoch=1)) == vrops.APPLIED
    assert fake.host_state("host-19", VC_A) == MAINTAINED
    assert [c.method for c in fake.history] == ["PUT"]  # since the reset: epoch 1's Enter


def test_a_record_from_before_key_epochs_reads_as_epoch_0(fake, r):
    """Records an older vebaq wrote have no key_epoch: they are epoch 0, so an epoch-0 event
    compares by key and any epoch-1 event is newer (the Lua compare-and-set agrees)."""
    assert run(enter("esx02", "host-20", VC_A, 500, T0)) == vrops.APPLIED
    key = f"vebaq:vrops:applied:{VC_A}:host-20"
    r.hdel(key, "key_epoch")  # as the previous version recorded it
    assert run(leave("esx02", "host-20", VC_A, 499, T0)) == vrops.STALE
    assert fake.host_state("host-20", VC_A) == MAINTAINED
    newer = leave("esx02", "host-20", VC_A, 2, T0, vcenterkeyepoch="1")  # binary-mode HTTP text
    host = vrops.host_event(newer)
    assert host.key_epoch == 1 and host.order > (0, 500, 0)
    assert vrops._record(r, host, "res-1") == (True, None)
    assert vrops._record(r, vrops.host_event(enter("esx02", "host-20", VC_A, 501, T0)),
                         "res-1") == (False, False)
    assert vrops.applied(r, VC_A, "host-20")["key_epoch"] == "1"


@pytest.mark.parametrize("bad", [-1, "x", True, "1.5"])
def test_a_bad_key_epoch_is_permanent(fake, bad):
    with pytest.raises(PermanentError, match="vcenterkeyepoch"):
        run(enter("esx01", "host-19", VC_A, 1, T0, vcenterkeyepoch=bad))
    assert fake.total_calls() == 0


def test_two_workers_racing_on_one_host_end_in_the_latest_state(fake):
    fake.configure(latency=0.05)
    run(leave("esx02", "host-20", VC_A, 1, T0))  # warm: token and resource id cached
    for i in range(5):
        at = T0 + timedelta(minutes=i + 1)
        pair = [enter("esx02", "host-20", VC_A, 10 * i + 10, at),
                leave("esx02", "host-20", VC_A, 10 * i + 11, at + timedelta(seconds=1))]
        results: list[str] = []
        threads = [threading.Thread(target=lambda ce=ce, out=results: out.append(run(ce)))
                   for ce in (pair if i % 2 else reversed(pair))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) in (["applied", "applied"], ["applied", "stale"])
        assert fake.host_state("host-20", VC_A) == STARTED


def test_newer_event_overtaking_an_expired_lock_is_reasserted(fake, monkeypatch, caplog):
    monkeypatch.setattr(vrops, "CALLS_UNDER_LOCK", 0)
    monkeypatch.setattr(vrops, "LOCK_SLACK", 0.05)  # the lock expires during the slow call
    client = vrops.client(workers.settings.settings().vrops)
    newer = leave("esx01", "host-19", VC_A, 2, T0 + timedelta(seconds=1))
    real_mark_host = client.mark_host
    overtaken: list[str] = []

    def slow_mark_host(name: str, moref: str, vc: str, maintained: bool) -> str:
        if maintained and not overtaken:  # the Enter's PUT arrives after the newer Exit's DELETE
            time.sleep(0.1)
            thread = threading.Thread(target=lambda: overtaken.append(run(newer)))
            thread.start()
            thread.join()
        return real_mark_host(name, moref, vc, maintained)

    monkeypatch.setattr(client, "mark_host", slow_mark_host)
    assert run(enter("esx01", "host-19", VC_A, 1, T0)) == vrops.STALE
    assert overtaken == [vrops.APPLIED]
    assert [c.method for c in fake.history] == ["DELETE", "PUT", "DELETE"]
    assert fake.host_state("host-19", VC_A) == STARTED
    assert "lock expired" in caplog.text


def test_interleaved_workers_with_failures_end_in_the_latest_state(r, monkeypatch, capsys):
    rng = random.Random(20240506)
    hosts = [(f"esx{i}", f"host-{100 + i}", vc) for vc in (VC_A, VC_B) for i in range(1, 26)]
    # "esx1" also matches esx10..esx19 and both vCenters have the same names and morefs.
    timeline = []
    for name, moref, vc in hosts:
        at = T0 + timedelta(seconds=rng.randint(0, 60))
        for step in range(rng.randint(1, 6)):
            at += timedelta(seconds=rng.randint(0, 90), microseconds=rng.randint(0, 999_999))
            timeline.append((at, step % 2 == 0, name, moref, vc))
    timeline.sort(key=lambda item: item[0])
    events, latest = [], {}
    for key, (at, entering, name, moref, vc) in enumerate(timeline, start=1000):
        make = enter if entering else leave
        events.append(make(name, moref, vc, key, at))
        latest[(vc, moref)] = MAINTAINED if entering else STARTED
    deliveries = events + rng.sample(events, len(events) // 10)  # some redeliveries too
    rng.shuffle(deliveries)

    with FakeVrops(hosts, username="admin", password=PASSWORD, seed=7) as fake:
        configure(monkeypatch, fake.url)
        fake.configure(fail_rate=0.2, latency=0.003)  # latency: more overlap between workers
        work: queue.Queue = queue.Queue()
        for ce in deliveries:
            work.put(ce)
        outcomes: Counter[str] = Counter()
        unexpected: list[BaseException] = []
        lock = threading.Lock()

        def worker() -> None:
            while True:
                ce = work.get()
                if ce is None:
                    return
                try:
                    outcome = run(ce)
                except (VropsUnavailable, vrops.HostBusy):
                    outcome = "retried"
                    work.put(ce)  # back at the end of the queue, like a delayed retry
                except BaseException as exc:  # reported below
                    outcome = "failed"
                    with lock:
                        unexpected.append(exc)
                with lock:
                    outcomes[outcome] += 1
                work.task_done()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        work.join()
        for _ in threads:
            work.put(None)
        for thread in threads:
            thread.join(timeout=5)
        fake.configure(fail_rate=0)

        assert unexpected == []
        wrong = {host: (fake.host_state(host[1], host[0]), want)
                 for host, want in latest.items() if fake.host_state(host[1], host[0]) != want}
        assert wrong == {}
        for (vc, moref), want in latest.items():
            assert vrops.applied(r, vc, moref)["maintained"] == ("1" if want == MAINTAINED else "0")
        # Every event succeeded at most once at vROps (stale ones and duplicates never).
        assert len(fake.history) <= len(events)
        assert outcomes["applied"] + outcomes["stale"] + outcomes["duplicate"] == len(deliveries)
        assert outcomes["duplicate"] >= 1 and outcomes["stale"] >= 1 and outcomes["retried"] >= 1

        total = fake.total_calls()
        with capsys.disabled():
            print(f"\n[vrops concurrency] {len(hosts)} hosts, {len(events)} events, "
                  f"{len(deliveries)} deliveries, 4 workers, 20% 5xx: "
                  f"outcomes {dict(outcomes)}; vROps calls {dict(fake.calls)} "
                  f"(injected {dict(fake.injected)}) = {total} calls, "
                  f"{total / len(events):.2f} per event, "
                  f"{(total - fake.injected['5xx']) / len(events):.2f} per event excluding "
                  f"failed calls; {len(fake.history)} maintained PUT/DELETE applied")
