"""One active producer per vCenter: a lease in Redis, renewed by its holder.

Run two producers for the same vCenter (``docker compose up --scale producer=2``) and one reads
while the other stands by; when the holder dies its lease expires after :data:`LEASE_TTL` and a
standby takes over from the checkpoint. With several vCenters each has its own lease, and the
producers share them out (:mod:`producer.supervisor`). The checkpoint commit is fenced by the
lease (see :meth:`producer.checkpoint.CheckpointStore.commit`), so a holder that stalled past its
lease cannot move the checkpoint after another took over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid

import redis

from vebaq.core import keys
from vebaq.core.config import normalise_sdk_url
from vebaq.core.redisdb import Script, explain_redis_error

logger = logging.getLogger("vebaq.producer")

#: Seconds a lease lasts without renewal: how long a standby waits after the holder died.
LEASE_TTL = 10.0

_RENEW = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")
_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


#: The lease scope of the built-in simulated source (``vebaq producer --simulate``).
SIMULATED_SCOPE = "simulated"


def vcenter_scope(url: str | None) -> str:
    """What the lease of the vCenter at ``url`` is named by: its normalised URL, so that two
    spellings of one URL share one lease (``None``: the simulated source)."""
    return SIMULATED_SCOPE if url is None else normalise_sdk_url(url)


def producer_id() -> str:
    """``host:pid:random``: unique per producer process, and says where it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The right to read one vCenter.

    :param scope: what the lease is for (the vCenter's normalised URL).
    :param ttl: seconds without renewal after which the lease is free.
    :param holder: who holds it (the producer's id, :func:`producer_id`; a new one by default).
    """

    def __init__(self, r: redis.Redis, scope: str, ttl: float = LEASE_TTL,
                 holder: str | None = None) -> None:
        self.redis = r
        self.scope = scope
        self.key = keys.lease(scope)
        self.ttl = ttl
        self.holder = holder or producer_id()
        self.held = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current_holder(self) -> str | None:
        value = self.redis.get(self.key)
        return value.decode() if value else None

    def try_acquire(self) -> bool:
        if self.redis.set(self.key, self.holder, nx=True, px=int(self.ttl * 1000)):
            self.held.set()
            self._start_renewing()
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease; False (and :attr:`held` cleared) if it was lost."""
        try:
            ok = bool(_RENEW(self.redis, keys=[self.key], args=[self.holder, int(self.ttl * 1000)]))
        except redis.RedisError as exc:
            # Cannot tell: keep going until the lease would have expired anyway.
            logger.warning("cannot renew the lease of %s: %s", self.scope,
                           explain_redis_error(exc, self.redis))
            return self.held.is_set()
        if not ok:
            self.held.clear()
        return ok

    def _start_renewing(self) -> None:
        # A new event per holding: a renewer of an earlier holding still between two waits must
        # see its own stop, not a cleared one.
        self._stop = stop = threading.Event()

        def renew_loop() -> None:
            while not stop.wait(self.ttl / 3):
                if not self.renew():
                    logger.error("lost the lease of %s to %s", self.scope,
                                 self.current_holder())
                    return

        self._thread = threading.Thread(target=renew_loop, name="vebaq-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self.held.is_set():
            self.held.clear()
            with contextlib.suppress(redis.RedisError):  # else it expires by itself
                _RELEASE(self.redis, keys=[self.key], args=[self.holder])
