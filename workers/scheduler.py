"""The retry scheduler: a thread in every worker main process that sends due retries.

Every :data:`INTERVAL` seconds it claims due retries from the retry store
(:mod:`vebaq.core.retrystore`), publishes them to their pools' queues in one batch, and releases
them once Redis took the batch. Started and stopped by :mod:`workers.signals`.

A worker killed during a back-off loses nothing: the retry is in Redis, and any worker (or the
same one, restarted) sends it when it is due.
"""

from __future__ import annotations

import logging
import threading

import redis
from celery import Celery

from vebaq.core import retrystore
from vebaq.core.publish import Publisher
from vebaq.core.redisdb import client, explain_redis_error

logger = logging.getLogger("vebaq.scheduler")

#: Seconds between two sweeps (the lateness of a retry).
INTERVAL = 0.5


def sweep(publisher: Publisher, r: redis.Redis, limit: int = retrystore.BATCH) -> int:
    """Send every retry that is due; returns how many were sent."""
    sent = 0
    while True:
        claimed = retrystore.claim(r, limit)
        usable = [retry for retry in claimed if retry.message is not None]
        for retry in claimed:
            if retry.message is None:
                logger.error("retry %s: its record is missing or unreadable; dropped", retry.id)
        publisher.publish([retry.message for retry in usable])
        for retry in usable:
            message = retry.message
            logger.info("retry %s: sent %s[%s] to pool %s (attempt %d: %s)", retry.id,
                        message.subject, message.task_id, message.pool, message.attempt,
                        ", ".join(message.functions or ()))
        retrystore.release(r, [retry.id for retry in claimed])
        sent += len(usable)
        if len(claimed) < limit:
            return sent


class Scheduler(threading.Thread):
    """A daemon thread that runs :func:`sweep` every ``interval`` seconds until :meth:`stop`.

    :param app: the Celery app to send with (its ``broker_url`` is also the retry store).
    """

    def __init__(self, app: Celery, interval: float = INTERVAL) -> None:
        super().__init__(name="vebaq-retry-scheduler", daemon=True)
        self.publisher = Publisher(app)
        self.redis = client(app.conf.broker_url)
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        failing = False
        while not self.stopping.is_set():
            try:
                sweep(self.publisher, self.redis)
            except Exception as exc:  # Redis or broker down: retries wait in Redis, try later
                if not failing:
                    logger.warning("retry scheduler: cannot send due retries (will keep "
                                   "trying): %s", explain_redis_error(exc, self.redis))
                failing = True
            else:
                if failing:
                    logger.info("retry scheduler: sending due retries again")
                failing = False
            self.stopping.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.join(timeout)
