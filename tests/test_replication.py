"""vebaq.core.replication on a real master and replica: no WAIT without replicas, an
acknowledged WAIT with one, NotReplicated when the replica is stopped (SIGSTOP), nothing to wait
for once it is gone."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import redis

from producer.metrics import ReplicationCollector
from tests.support import RedisServer, wait_until
from vebaq.core import redisdb, replication


def waits(r: redis.Redis) -> int:
    return r.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)


def test_confirm_waits_only_when_a_replica_exists(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master")
    replica = None
    try:
        r = redisdb.connect(master.url())
        r.set("k", 1)
        assert replication.confirm(r) == 0
        assert waits(r) == 0, "a single Redis pays no WAIT"

        replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
        wait_until(lambda: r.info("replication")["connected_slaves"] == 1, 20, "the replica")
        # Still loading its first copy: not waited for (every wait would time out).
        syncing = r.info("replication")["slave0"]["state"] != "online"
        wait_until(lambda: r.info("replication")["slave0"]["state"] == "online", 20, "in sync")
        time.sleep(replication.REPLICAS_CHECK_INTERVAL)  # the cached count expires
        r.set("k", 2)
        assert replication.confirm(r) == 1
        assert waits(r) == 1
        with redis.Redis(port=replica.port) as rep:
            assert rep.get("k") == b"2"

        replica.popen.send_signal(signal.SIGSTOP)  # connected, but acknowledges nothing
        try:
            r.set("k", 3)
            started = time.monotonic()
            before = replication.NOT_REPLICATED
            try:
                replication.confirm(r, timeout_ms=300)
            except replication.NotReplicated as exc:
                assert "within 300 ms" in str(exc)
            else:
                raise AssertionError("a stopped replica acknowledged a write")
            assert time.monotonic() - started < 2
            assert before + 1 == replication.NOT_REPLICATED
            [family] = ReplicationCollector().collect()  # the producer's /metrics shows it
            assert family.samples[0].value == replication.NOT_REPLICATED
        finally:
            replica.popen.send_signal(signal.SIGCONT)
        assert replication.confirm(r) == 1

        replica.kill()  # gone: the master notices, and confirm stops waiting
        wait_until(lambda: r.info("replication")["connected_slaves"] == 0, 30, "the master "
                   "to notice", 0.2)
        time.sleep(replication.REPLICAS_CHECK_INTERVAL)
        assert replication.confirm(r) == 0
        print(f"\n[replication] replica seen syncing before online: {syncing}")
    finally:
        if replica is not None:
            replica.stop()
        master.stop()


def test_a_server_without_info_has_no_replicas() -> None:
    """The embedded broker of `vebaq dev` (fakeredis) answers INFO with an error."""
    from vebaq.devtools.embedded import EmbeddedRedis

    embedded = EmbeddedRedis().start()
    try:
        assert replication.confirm(redis.Redis.from_url(embedded.url)) == 0
    finally:
        embedded.stop()
