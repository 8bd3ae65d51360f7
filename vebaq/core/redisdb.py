"""The Redis client every vebaq process uses for its own keys, and the one way Lua runs.

:func:`client` gives one client per (process, URL): safe across prefork's ``fork`` (a child never
reuses its parent's sockets). :class:`Script` is how every Lua script in vebaq is defined and
run: once per module, called with the client, its keys and its arguments (``EVALSHA``, loading
the script again after ``NOSCRIPT``, e.g. after a Redis restart).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence

import redis
from redis.commands.core import Script as _RedisScript

from vebaq.core.errors import BrokerError
from vebaq.core.secrets import redact_url, scrub

#: Seconds a command may take before the client gives up (a hung Redis is an error, not a hang).
SOCKET_TIMEOUT = 10.0
#: Seconds to establish a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds between pings on an idle pooled connection before it is reused.
HEALTH_CHECK_INTERVAL = 30

_clients: dict[tuple[int, str], redis.Redis] = {}
_lock = threading.Lock()


def connect(url: str, socket_timeout: float = SOCKET_TIMEOUT) -> redis.Redis:
    """A new client for ``url`` (the caller owns and closes it)."""
    return redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                socket_connect_timeout=CONNECT_TIMEOUT,
                                health_check_interval=HEALTH_CHECK_INTERVAL)


def client(url: str) -> redis.Redis:
    """The shared client for ``url`` in this process."""
    key = (os.getpid(), url)
    with _lock:
        if key not in _clients:
            _clients[key] = connect(url)
        return _clients[key]


#: redis-py's prefix for an error reply inside a pipeline: ``Command # 1 (LLEN echo) of pipeline
#: caused error: ``.
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ")


def out_of_memory(error: BaseException) -> bool:
    """Did Redis refuse a write for want of memory (``maxmemory`` reached, ``noeviction``)?
    Looks through the causes too: kombu wraps the error of a failed publish."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, redis.OutOfMemoryError) or "OOM command not allowed" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def explain_redis_error(error: BaseException, r: redis.Redis | None = None) -> str:
    """One line for a failed Redis call: ``Type: message``, or for a Redis out of memory
    ``Redis is out of memory (maxmemory 100.00M, noeviction): OOM command not allowed …`` —
    the limit and policy read from ``r`` when it still answers ``INFO``."""
    if not out_of_memory(error):
        return f"{type(error).__name__}: {error}"
    detail = "maxmemory reached"
    if r is not None:
        try:
            info = r.info("memory")
            detail = f"maxmemory {info.get('maxmemory_human')}, {info.get('maxmemory_policy')}"
        except redis.RedisError:
            pass
    cause = error
    while not isinstance(cause, redis.OutOfMemoryError) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    reply = _PIPELINE_PREFIX.sub("", str(cause).strip())
    return f"Redis is out of memory ({detail}): {reply}"


def check(url: str, secrets: Sequence[str] = ()) -> None:
    """Make sure the broker's Redis answers and takes our password, at a process's start;
    raises :class:`BrokerError` with one line (a refused password is permanent: retrying, as
    Celery's consumer would, only repeats it). Redis out of memory is reported when the first
    write fails, by :func:`explain_redis_error`."""
    where = redact_url(url)
    probe = connect(url, socket_timeout=CONNECT_TIMEOUT)
    try:
        probe.ping()
    except redis.AuthenticationError as exc:
        detail = "wrong password" if "invalid" in str(exc) or "WRONGPASS" in str(exc) \
            else scrub(str(exc).rstrip("."), tuple(secrets)).lower()
        if redis.connection.parse_url(url).get("password") is None:
            detail = "it needs a password, and the URL has none"
        raise BrokerError(f"Redis at {where} refused the connection: {detail}") from None
    except redis.ResponseError as exc:  # e.g. an old Redis refusing AUTH without a password
        raise BrokerError(f"Redis at {where}: {scrub(str(exc), tuple(secrets))}") from None
    except redis.RedisError as exc:
        raise BrokerError(f"cannot reach Redis at {where}: "
                          f"{scrub(str(exc), tuple(secrets))}") from None
    finally:
        probe.close()


class Script:
    """A Lua script, defined once at module level and run with any client.

    :param source: the Lua text.
    """

    def __init__(self, source: str) -> None:
        self._script = _RedisScript(None, source.encode())

    def __call__(self, r: redis.Redis, keys: Sequence[str] = (),
                 args: Sequence[object] = ()) -> object:
        return self._script(keys=list(keys), args=list(args), client=r)
