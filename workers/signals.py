"""Celery signal receivers of the worker: settings checked at start, the retry scheduler, and
dead letters for what Celery would drop.

Imported by :mod:`workers.app`, so that ``vebaq worker`` and ``celery -A workers worker`` alike:

* check the settings and the broker's Redis at start (one line and exit on a bad config or
  a refused password, not on the first task or in an endless reconnect loop);
* start a :class:`~workers.scheduler.Scheduler` thread in the worker main process once the
  worker is ready (``worker_ready`` fires there only, whatever the execution pool), and stop it
  on shutdown;
* dead-letter the messages Celery logs and discards: a task that failed outside
  :func:`workers.execution.handle` (a hard time limit — named with the function it stopped —,
  a crash in Celery's own code), a message
  with a refused content type or without task headers (``task_rejected``), a reserved task name
  (``task_unknown``), and, through :func:`dead_letter_message` called from the consumer's
  ``on_decode_error``, a body that cannot be decoded.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections import OrderedDict
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery import Celery, Task, signals
from celery.worker.consumer import Consumer
from kombu import Message

from vebaq.core import deadletters, redisdb
from vebaq.core.errors import HardTimeLimit, PoisonMessage, VebaqError, error_line
from vebaq.core.redisdb import client
from workers import breaker
from workers.pools import functions_for
from workers.retries import DeadLettered
from workers.scheduler import Scheduler
from workers.settings import settings

logger = logging.getLogger("vebaq.signals")

#: Longest undecodable message body kept in a dead letter, in bytes (bodies are a few KiB).
MAX_DEAD_LETTER_BODY = 64 * 1024

#: Task ids :func:`dead_letter_failed_task` dead-lettered lately (oldest first), and how many
#: it remembers: Celery sends ``task_failure`` twice for a hard time limit (from the result
#: and from the timeout handler), which must make one dead letter.
_failed_recently: OrderedDict[str, None] = OrderedDict()
_FAILED_REMEMBERED = 1000

#: The running scheduler thread of this process, if any.
_scheduler: Scheduler | None = None


@signals.celeryd_init.connect(dispatch_uid="vebaq.check_settings")
def check_settings(conf: Any = None, **_: Any) -> None:
    """Fail at start, in one line, on a bad config or a Redis that refuses us (a wrong password
    is permanent: Celery's consumer would retry it for ever), instead of on the first task.

    ``celeryd_init`` is the worker program's first signal: before Celery's banner and its
    warnings, so that the error line is the only one."""
    secrets: tuple[str, ...] = ()
    try:
        current = settings()
        secrets = current.secrets()
        redisdb.check(getattr(conf, "broker_url", None) or current.broker_url, secrets)
    except VebaqError as exc:
        print(error_line(str(exc), secrets), file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None


@signals.worker_ready.connect(dispatch_uid="vebaq.start_retry_scheduler")
def start_retry_scheduler(sender: Consumer | None = None, **_: Any) -> None:
    """Start this worker's scheduler thread (``sender`` is the worker's consumer)."""
    global _scheduler
    if _scheduler is None or not _scheduler.is_alive():
        _scheduler = Scheduler(sender.app)
        _scheduler.start()
        logger.info("retry scheduler: started (sends due retries every %.1fs)",
                    _scheduler.interval)


@signals.worker_shutdown.connect(dispatch_uid="vebaq.stop_retry_scheduler")
def stop_retry_scheduler(**_: Any) -> None:
    global _scheduler
    if _scheduler is not None:
        _scheduler.stop()
        _scheduler = None


@signals.task_failure.connect(dispatch_uid="vebaq.dead_letter_failed_task")
def dead_letter_failed_task(sender: Task | None = None, task_id: str | None = None,
                            exception: BaseException | None = None, args: Any = None,
                            kwargs: Any = None, **_: Any) -> None:
    """Dead-letter a task that failed other than by :class:`DeadLettered` (already recorded)."""
    if sender is None or exception is None or isinstance(exception, DeadLettered):
        return
    if task_id in _failed_recently:  # Celery signals a hard time limit twice
        return
    if task_id:
        _failed_recently[task_id] = None
        while len(_failed_recently) > _FAILED_REMEMBERED:
            _failed_recently.popitem(last=False)
    if not isinstance(kwargs, dict):
        kwargs = {}
    attempt = kwargs.get("attempt")
    delivery = getattr(getattr(sender, "request", None), "delivery_info", None) or {}
    r = client(sender.app.conf.broker_url)
    if isinstance(exception, TimeLimitExceeded) and task_id:
        # Celery killed the prefork child: name the function it was running, and forget the
        # journal, the task is over.
        running = _running(r, sender.name, task_id, kwargs)
        limit = exception.args[0] if exception.args else "?"
        exception = HardTimeLimit(
            f"hard time limit ({limit}s) exceeded"
            + (f" while running {running}" if running else "")
            + ": the pool child was killed (the soft limit did not stop the function)")
    if task_id:
        breaker.finish(r, task_id)
    letter = deadletters.add(
        r, task_name=sender.name,
        pool=kwargs.get("pool") or delivery.get("routing_key"), function=None,
        event=kwargs.get("event"), error=exception,
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1, task_id=task_id,
        message={"args": args, "kwargs": kwargs})
    logger.error("%s[%s] failed outside vebaq's failure handling → dead letter %s: %s",
                 sender.name, task_id, letter, deadletters.describe(exception))


def _running(r: Any, subject: str, task_id: str, kwargs: dict[str, Any]) -> str | None:
    """The function a task killed by its time limit was running (``None``: cannot tell)."""
    pool, event = kwargs.get("pool"), kwargs.get("event")
    if not isinstance(pool, str) or not isinstance(event, dict) or not event.get("id"):
        return None
    names = [fn.name for fn in functions_for(pool, subject)
             if not kwargs.get("functions") or fn.name in kwargs["functions"]]
    return breaker.running(r, task_id, pool, str(event["id"]), names)


def _body(body: Any) -> str:
    """The body as text, or ``base64:…`` when it is not UTF-8; at most
    :data:`MAX_DEAD_LETTER_BODY` bytes."""
    if isinstance(body, str):
        body = body.encode("utf-8", "replace")
    if not isinstance(body, bytes | bytearray):
        return repr(body)[:MAX_DEAD_LETTER_BODY]
    body = bytes(body[:MAX_DEAD_LETTER_BODY])
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(body).decode("ascii")


def dead_letter_message(app: Celery, message: Message,
                        error: BaseException | None) -> str | None:
    """Dead-letter a transport message that never became a task call; returns the id, or
    ``None`` when even that failed (logged: the message is acked by Celery all the same).

    :param message: the :class:`kombu.Message`.
    :param error: why Celery refused it (``None``: it had no task headers at all).
    """
    headers = dict(getattr(message, "headers", None) or {})
    delivery = dict(getattr(message, "delivery_info", None) or {})
    error = error or PoisonMessage("not a Celery task message (no task headers)")
    try:
        letter = deadletters.add(
            client(app.conf.broker_url), task_name=str(headers.get("task") or ""),
            pool=delivery.get("routing_key"), function=None, event=None, error=error,
            attempt=1, task_id=headers.get("id"),
            message={"headers": headers, "content_type": getattr(message, "content_type", None),
                     "content_encoding": getattr(message, "content_encoding", None),
                     "body": _body(getattr(message, "body", b""))})
    except Exception as exc:  # Redis down: Celery's own log line is all that is left
        logger.error("cannot dead-letter an unusable message: %s", deadletters.describe(exc))
        return None
    logger.error("unusable message → dead letter %s: %s", letter, deadletters.describe(error))
    return letter


@signals.task_rejected.connect(dispatch_uid="vebaq.dead_letter_rejected")
def _dead_letter_rejected(sender: Consumer | None = None, message: Message | None = None,
                          exc: BaseException | None = None,
                          **_: Any) -> None:
    if sender is not None and message is not None:
        dead_letter_message(sender.app, message, exc)


@signals.task_unknown.connect(dispatch_uid="vebaq.dead_letter_unknown")
def _dead_letter_unknown(sender: Consumer | None = None, message: Message | None = None,
                         exc: BaseException | None = None,
                         **_: Any) -> None:
    if sender is not None and message is not None:
        dead_letter_message(sender.app, message, exc)
