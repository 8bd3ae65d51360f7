"""The Redis client every vebaq process uses for its own keys, and the one way Lua runs.

:func:`client` gives one client per (process, URL): safe across prefork's ``fork`` (a child never
reuses its parent's sockets). :class:`Script` is how every Lua script in vebaq is defined and
run: once per module, called with the client, its keys and its arguments (``EVALSHA``, loading
the script again after ``NOSCRIPT``, e.g. after a Redis restart).

Redis Sentinel: a broker URL of ``sentinel://`` alternatives, kombu's syntax
(``sentinel://[:password@]host:port[/db];sentinel://host2:port2;…``), names the Sentinels, not
a Redis. The master's name and the Sentinels' own password are not in the URL (kombu takes them
from transport options): :func:`register_sentinel` records them for the URL — the settings do it
for their broker URL (:class:`vebaq.core.config.Settings`), so every process that loaded its
settings has them, prefork children included. A client for such a URL is
``Sentinel(...).master_for(name)``: each new connection asks the Sentinels where the master is,
and a connection to a demoted master (``READONLY``) or a dead one fails and is made again to the
promoted replica, so vebaq's clients follow a failover as kombu's do. The URL's password and
database are the master's; the Sentinel password is sent to the Sentinels only.

Failure modes: a Sentinel URL without a registered master name is refused with one line
(:class:`BrokerError`); no Sentinel answering, or none knowing the master, is a
``redis.ConnectionError`` (``MasterNotFoundError``) like a Redis that is down.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from redis.commands.core import Script as _RedisScript

from vebaq.core.errors import BrokerError
from vebaq.core.secrets import Secret, redact_url, scrub

#: Seconds a command may take before the client gives up (a hung Redis is an error, not a hang).
SOCKET_TIMEOUT = 10.0
#: Seconds to establish a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds between pings on an idle pooled connection before it is reused.
HEALTH_CHECK_INTERVAL = 30

#: Port of a Sentinel whose URL names none (Redis Sentinel's default).
SENTINEL_PORT = 26379

_clients: dict[tuple[int, str], redis.Redis] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class SentinelOptions:
    """What a ``sentinel://`` URL does not say: the monitored master's name, and the password
    the Sentinels themselves ask for (empty: none)."""

    master_name: str
    password: Secret = Secret("")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` broker URL: the Sentinels' addresses, and the master's
    credentials and database (taken from the first alternative, as kombu does)."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


_sentinel_options: dict[str, SentinelOptions] = {}


def is_sentinel(url: str) -> bool:
    """Does ``url`` name Redis Sentinels (``sentinel://…``) rather than a Redis?"""
    return url.strip().lower().startswith("sentinel://")


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split kombu's ``sentinel://h1:p1;sentinel://h2:p2/db`` syntax; raises ``ValueError``
    (without the password) for an alternative that is not ``sentinel://host[:port]``."""
    sentinels = []
    first = None
    for i, part in enumerate(p.strip() for p in url.split(";")):
        if not part:
            continue
        parts = urlsplit(part)
        if parts.scheme.lower() != "sentinel" or not parts.hostname:
            raise ValueError(f"alternative {i + 1} is not sentinel://host[:port]")
        port = parts.port or SENTINEL_PORT  # raises ValueError on a malformed port
        sentinels.append((parts.hostname, port))
        first = first or parts
    if first is None:
        raise ValueError("no Sentinel in the URL")
    db = first.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError("the database must be a number")
    return SentinelURL(tuple(sentinels), unquote(first.username) if first.username else None,
                       unquote(first.password) if first.password is not None else None,
                       int(db or 0))


def normalise_sentinel_url(url: str) -> str:
    """``url`` with the first alternative's credentials and database on every alternative.

    kombu connects with the alternative it is trying (the next one when a Sentinel is down),
    taking that alternative's password and database: written once, on the first or last as
    people do, they would apply to one Sentinel only. Raises ``ValueError`` when alternatives
    name different ones (which would make the database depend on which Sentinel answered)."""
    parsed = parse_sentinel_url(url)
    userinfo, db = None, None
    for part in (p.strip() for p in url.split(";") if p.strip()):
        parts = urlsplit(part)
        info = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
        path = parts.path.lstrip("/") or None
        if info is not None:
            if userinfo is not None and info != userinfo:
                raise ValueError("the alternatives name different passwords")
            userinfo = info
        if path is not None:
            if db is not None and path != db:
                raise ValueError("the alternatives name different databases")
            db = path
    auth = f"{userinfo}@" if userinfo is not None else ""
    return ";".join(f"sentinel://{auth}{host}:{port}/{db or parsed.db}"
                    for host, port in parsed.sentinels)


def register_sentinel(url: str, options: SentinelOptions) -> None:
    """Record the master name and Sentinel password of a ``sentinel://`` URL, for
    :func:`connect` and :func:`client` (and :func:`sentinel_options`)."""
    with _lock:
        _sentinel_options[url] = options


def sentinel_options(url: str) -> SentinelOptions:
    """The registered options of a ``sentinel://`` URL; :class:`BrokerError` if none."""
    options = _sentinel_options.get(url)
    if options is None or not options.master_name:
        raise BrokerError(f"the broker URL {redact_url(url)} names Redis Sentinels but no master "
                          "name is set (broker.masterName or VEBAQ_BROKER_MASTER_NAME)")
    return options


def connect(url: str, socket_timeout: float = SOCKET_TIMEOUT) -> redis.Redis:
    """A new client for ``url`` (the caller owns and closes it); for a ``sentinel://`` URL the
    client of the master the Sentinels name, following failovers (see the module docstring)."""
    if is_sentinel(url):
        return _sentinel_client(url, socket_timeout)
    return redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                socket_connect_timeout=CONNECT_TIMEOUT,
                                health_check_interval=HEALTH_CHECK_INTERVAL)


def _sentinel_client(url: str, socket_timeout: float) -> redis.Redis:
    options = sentinel_options(url)
    try:
        parsed = parse_sentinel_url(url)
    except ValueError as exc:
        raise BrokerError(f"malformed Sentinel URL {redact_url(url)}: {exc}") from None
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": CONNECT_TIMEOUT}
    sentinel_kwargs: dict[str, object] = dict(timeouts)
    if options.password:
        sentinel_kwargs["password"] = options.password.reveal()
    sentinel = redis.sentinel.Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs,
                                       **timeouts)
    master: dict[str, object] = {"db": parsed.db, "health_check_interval": HEALTH_CHECK_INTERVAL}
    if parsed.password is not None:
        master["password"] = parsed.password
    if parsed.username:
        master["username"] = parsed.username
    return sentinel.master_for(options.master_name, **master)


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


#: redis-py's MasterNotFoundError lists each Sentinel's client repr and its error class.
_SENTINEL_ERROR = re.compile(r" - (?:\w+:)?(\w+(?:Error|Exception))")


def explain_master_not_found(error: BaseException) -> str:
    """``No master found for 'vebaq'`` and why, in a few words: redis-py's message holds the
    repr of every Sentinel client tried (hundreds of characters each)."""
    text = str(error)
    head = text.split(" : ", 1)[0].strip()
    reasons = sorted(set(_SENTINEL_ERROR.findall(text)))
    if "AuthenticationError" in reasons:
        return (f"{head}: the Sentinels refused the Sentinel password "
                "(broker.sentinelPassword or VEBAQ_SENTINEL_PASSWORD)")
    if reasons:
        return f"{head}: the Sentinels failed ({', '.join(reasons)})"
    return f"{head}: no Sentinel knows it (a wrong broker.masterName?) or none has a master yet"


def explain_redis_error(error: BaseException, r: redis.Redis | None = None) -> str:
    """One line for a failed Redis call: ``Type: message``, or for a Redis out of memory
    ``Redis is out of memory (maxmemory 100.00M, noeviction): OOM command not allowed …`` —
    the limit and policy read from ``r`` when it still answers ``INFO``."""
    if isinstance(error, redis.sentinel.MasterNotFoundError):
        return f"{type(error).__name__}: {explain_master_not_found(error)}"
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
    if is_sentinel(url):
        where = f"{where} (master {sentinel_options(url).master_name!r})"
    try:
        probe.ping()
    except redis.AuthenticationError as exc:
        detail = "wrong password" if "invalid" in str(exc) or "WRONGPASS" in str(exc) \
            else scrub(str(exc).rstrip("."), tuple(secrets)).lower()
        if _password_of(url) is None:
            detail = "it needs a password, and the URL has none"
        raise BrokerError(f"Redis at {where} refused the connection: {detail}") from None
    except redis.ResponseError as exc:  # e.g. an old Redis refusing AUTH without a password
        raise BrokerError(f"Redis at {where}: {scrub(str(exc), tuple(secrets))}") from None
    except redis.sentinel.MasterNotFoundError as exc:
        raise BrokerError(f"cannot reach Redis at {where}: "
                          f"{scrub(explain_master_not_found(exc), tuple(secrets))}") from None
    except redis.RedisError as exc:
        raise BrokerError(f"cannot reach Redis at {where}: "
                          f"{scrub(str(exc), tuple(secrets))}") from None
    finally:
        probe.close()


def _password_of(url: str) -> str | None:
    if is_sentinel(url):
        return parse_sentinel_url(url).password
    return redis.connection.parse_url(url).get("password")


class Script:
    """A Lua script, defined once at module level and run with any client.

    :param source: the Lua text.
    """

    def __init__(self, source: str) -> None:
        self._script = _RedisScript(None, source.encode())

    def __call__(self, r: redis.Redis, keys: Sequence[str] = (),
                 args: Sequence[object] = ()) -> object:
        return self._script(keys=list(keys), args=list(args), client=r)
