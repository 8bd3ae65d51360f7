"""Configuration: defaults, then a YAML file (``VEBAQ_CONFIG``), then environment variables.

The file is modelled on the VEBA router config; every key is optional::

    broker:
      url: redis://127.0.0.1:6379/0   # or Sentinels: sentinel://s1:26379;sentinel://s2:26379/0
      masterName: mymaster          # with sentinel:// URLs: the master the Sentinels monitor
      sentinelPassword: {env: SENTINEL_PASSWORD}  # if the Sentinels ask for one
      visibilityTimeout: 5m         # redeliver a dead worker's task after this
      taskSentEvents: true          # Flower shows queued tasks (false: fastest drain)
    vcenter:
      url: https://vc.example.com/sdk
      username: administrator@vsphere.local
      password: ...                 # better: VCENTER_PASSWORD
      insecureSSL: false
      caBundle: /etc/ssl/vc-ca.pem
      pollInterval: 1s
      maxPollInterval: 5s
      pageSize: 1000
      requestTimeout: 20s           # one SOAP call; a hung vCenter counts as down after this
      notifications: true           # wake on vCenter's change notifications between polls
      pushdown: true                # vCenter sends only events some trigger may match
      checkpoint: {maxAge: 1h}
    vcenters:                       # several vCenters instead of the one above (see below)
      - url: https://vc01.example.com/sdk
        password: {env: VC01_PASSWORD}
      - {url: https://vc02.example.com/sdk, password: {env: VC02_PASSWORD}, pollInterval: 2s}
    archive:                        # every event, kept for `vebaq replay` (vebaq.core.archive)
      enabled: true
      maxAge: 7d                    # per vCenter; at most 7d (how long done markers last)
      maxEntries: 1000000
      maxBytes: 256MiB
    cloudevents:
      type: router                  # or: vsphere (com.vmware.vsphere.<Class>.v0)
    functions: [mycompany.vebaq_functions]
    triggers: [...]                 # see vebaq.core.routing
    pools:
      vrops: {retry: 8, backoffPolicy: exponential, backoffDelay: PT2S, maxDelay: 10m,
              maxDeliveries: 3, maxEventBytes: 1MiB, softTimeLimit: 4m, timeLimit: 4m30s}
      tickets:                      # an HTTP pool: POSTs each event to a CloudEvents sink
        sink: {url: https://fn.example/, mode: binary, timeout: 10s, token: {env: FN_TOKEN}}
    ingress:                        # vebaq ingress: CloudEvents in over HTTP
      port: 8081
      token: {env: INGRESS_TOKEN}   # or VEBAQ_INGRESS_TOKEN; or username/password (basic)
    vrops:
      url: https://vrops.example.com
      username: admin
      authSource: local

A secret (a password, a token, a header value) may be given as ``{env: NAME}``: it is then read
from the environment variable ``NAME`` when the settings load.

Several vCenters: ``vcenters`` lists them, each entry with the keys of ``vcenter`` (``url``
required). Then ``vcenter`` and the ``VCENTER_*`` variables give defaults for every entry (an
entry's own key wins), except the URL: ``vcenter.url`` or ``VCENTER_URL`` next to ``vcenters``
is refused, as are two entries for the same vCenter (the same URL, normalised by
:func:`normalise_sdk_url`). Without ``vcenters``, ``vcenter`` is a list of one.

Unknown keys and wrong types are refused with a :class:`~vebaq.core.errors.ConfigError` naming the
key, e.g. ``vebaq.yaml: vcenter.pollIntervall: unknown key``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from vebaq.core.done import DONE_TTL
from vebaq.core.errors import ConfigError, one_line
from vebaq.core.redisdb import (
    SentinelOptions,
    is_sentinel,
    normalise_sentinel_url,
    parse_sentinel_url,
    register_sentinel,
)
from vebaq.core.routing import DEFAULT_TRIGGERS, Trigger, parse_filter, parse_throttle
from vebaq.core.secrets import Secret, redact_url

#: Where the broker is when nothing says otherwise (the Redis a developer runs locally).
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

#: Seconds before a dead worker's unacked tasks are redelivered (``broker.visibilityTimeout``).
DEFAULT_VISIBILITY_TIMEOUT = 300.0

#: Seconds a task may run before Celery kills its prefork child (``pools.<pool>.timeLimit``),
#: unless 90 % of the visibility timeout is less: a task still running when the visibility
#: timeout passes is delivered a second time.
DEFAULT_TIME_LIMIT = 270.0
#: The soft limit (``SoftTimeLimitExceeded`` raised in the function) is this share of the hard
#: one unless ``softTimeLimit`` says otherwise.
SOFT_TIME_LIMIT_SHARE = 0.9
#: Bytes of a task's CloudEvent (structured JSON) above which it is dead-lettered unrun.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
#: Deliveries of one task that may end with the worker lost while a function runs; the next
#: one dead-letters that function (the poison breaker, :mod:`workers.breaker`).
DEFAULT_MAX_DELIVERIES = 3


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a pool's function is retried before it is dead-lettered.

    The Knative names are accepted in the file: ``retry`` (= max_retries), ``backoffPolicy``
    (``exponential`` or ``linear``) and ``backoffDelay`` (= initial_delay, ISO 8601 ``PT2S``).
    """

    max_retries: int = 5
    initial_delay: float = 1.0
    max_delay: float = 600.0
    backoff: str = "exponential"
    jitter: bool = True
    #: Longest server ``Retry-After`` honoured, in seconds (``maxRetryAfter``): a longer one is
    #: cut to this, so a misbehaving server cannot park an event for days.
    max_retry_after: float = 3600.0

    def delay(self, attempt: int, rand: Callable[[], float]) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based); ``rand`` gives [0, 1)."""
        if self.backoff == "linear":
            base = self.initial_delay * attempt
        else:
            base = self.initial_delay * 2 ** (attempt - 1)
        base = min(base, self.max_delay)
        # "Equal jitter": never less than half the back-off, so retries still space out.
        return base / 2 + rand() * base / 2 if self.jitter else base


@dataclass(frozen=True)
class PoolLimits:
    """Bounds on the work one event may cost a pool (``pools.<pool>`` keys in brackets).

    :param max_deliveries: how often a function may be interrupted by the loss of its worker
        (``kill -9``, ``os._exit``, the OOM killer, a threads worker restarted) for one task;
        the next delivery dead-letters it (``maxDeliveries``).
    :param max_event_bytes: a larger CloudEvent is dead-lettered without running a function
        (``maxEventBytes``).
    :param soft_time_limit: seconds before ``SoftTimeLimitExceeded`` is raised inside the
        function: an ordinary failure, retried (``softTimeLimit``).
    :param time_limit: seconds before Celery kills the prefork child running the task; the
        task is dead-lettered (``timeLimit``). Must stay below the visibility timeout.
    """

    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    soft_time_limit: float | None = None
    time_limit: float | None = None

    def resolved(self, visibility_timeout: float, path: str = "pools") -> PoolLimits:
        """The limits with the time limits filled in and checked against the visibility
        timeout; raises :class:`ConfigError` naming the key (under ``path``)."""
        hard = self.time_limit
        if hard is None:
            hard = min(DEFAULT_TIME_LIMIT, 0.9 * visibility_timeout)
            if self.soft_time_limit is not None and self.soft_time_limit >= hard:
                raise ConfigError(f"{path}.softTimeLimit: {self.soft_time_limit:g}s is not below "
                                  f"the default timeLimit ({hard:g}s); set timeLimit too")
        elif not 0 < hard < visibility_timeout:
            raise ConfigError(f"{path}.timeLimit: must be > 0 and below broker.visibilityTimeout "
                              f"({visibility_timeout:g}s), got {hard:g}s: a task still running "
                              f"after the visibility timeout is delivered a second time")
        soft = self.soft_time_limit
        if soft is None:
            soft = SOFT_TIME_LIMIT_SHARE * hard
        elif not 0 < soft < hard:
            raise ConfigError(f"{path}.softTimeLimit: must be > 0 and below timeLimit "
                              f"({hard:g}s), got {soft:g}s")
        if self.max_deliveries < 1:
            raise ConfigError(f"{path}.maxDeliveries: must be ≥ 1")
        if self.max_event_bytes < 1:
            raise ConfigError(f"{path}.maxEventBytes: must be ≥ 1")
        return replace(self, soft_time_limit=soft, time_limit=hard)


@functools.lru_cache(maxsize=8)
def _default_limits(visibility_timeout: float) -> PoolLimits:
    return PoolLimits().resolved(visibility_timeout)


@dataclass(frozen=True)
class VCenterSettings:
    url: str | None = None
    username: str | None = None
    password: Secret = Secret("")
    insecure_ssl: bool = False
    ca_bundle: str | None = None
    #: Seconds between polls while events keep coming.
    poll_interval: float = 1.0
    #: Idle polls back off by doubling up to this many seconds.
    max_poll_interval: float = 5.0
    #: Events per ReadNextEvents call (vCenter allows up to 1000).
    page_size: int = 1000
    #: Seconds one SOAP call to vCenter may take before it counts as failed (a hung vCenter,
    #: a half-open connection): then the producer reports it and logs in again.
    request_timeout: float = 20.0
    #: Between polls, wait on vCenter's change notification of its latest event
    #: (``WaitForUpdatesEx``) and read at once when it fires; the poll interval stays the
    #: upper bound. False: poll only.
    notifications: bool = True
    #: Ask vCenter for only the events some trigger could match (an ``EventFilterSpec`` derived
    #: from the triggers, :mod:`producer.pushdown`); False: read every event, route locally.
    pushdown: bool = True
    #: On restart, never replay events older than this many seconds.
    checkpoint_max_age: float = 3600.0
    #: Where it was configured (``vcenter`` or ``vcenters[2]``), for error messages.
    where: str = "vcenter"


@dataclass(frozen=True)
class VropsSettings:
    url: str | None = None
    username: str | None = None
    password: Secret = Secret("")
    auth_source: str | None = None
    insecure_ssl: bool = False
    ca_bundle: str | None = None
    #: Seconds for each HTTP call (connect and read).
    timeout: float = 10.0


#: How a sink receives events: ``binary`` (``ce-*`` headers, the data as the body; Knative's
#: default) or ``structured`` (the whole event as ``application/cloudevents+json``).
SINK_MODES = ("binary", "structured")

#: What an HTTP pool does with a CloudEvent its sink answers with (Knative's reply): ``ignore``
#: it (logged), or ``enqueue`` it through the triggers like any other event.
SINK_REPLIES = ("ignore", "enqueue")


@dataclass(frozen=True)
class SinkSettings:
    """An HTTP pool's subscriber: where and how its events are POSTed (``pools.<pool>.sink``).

    :param headers: extra request headers; values read from the environment are
        :class:`~vebaq.core.secrets.Secret` and never logged.
    :param token: sent as ``Authorization: Bearer <token>``.
    :param username: with :attr:`password`, sent as HTTP basic auth instead.
    """

    url: str
    mode: str = "binary"
    #: Seconds to connect, and to wait for each read of the answer.
    timeout: float = 10.0
    #: Requests in flight at once per worker process.
    concurrency: int = 8
    ca_bundle: str | None = None
    insecure_ssl: bool = False
    headers: tuple[tuple[str, str | Secret], ...] = ()
    token: Secret = Secret("")
    username: str | None = None
    password: Secret = Secret("")
    reply: str = "ignore"

    def secrets(self) -> tuple[str, ...]:
        values = [self.token.reveal(), self.password.reveal()]
        values += [v.reveal() for _, v in self.headers if isinstance(v, Secret)]
        return tuple(v for v in values if v)

    def __repr__(self) -> str:
        return f"SinkSettings(url={redact_url(self.url)!r}, mode={self.mode!r})"


#: Largest request ``vebaq ingress`` reads, in bytes (``ingress.maxRequestBytes``).
DEFAULT_INGRESS_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class IngressSettings:
    """``vebaq ingress``: where it listens and whom it lets in (``ingress``)."""

    bind: str = "0.0.0.0"
    port: int = 8081
    #: The path events are POSTed to.
    path: str = "/"
    #: ``Authorization: Bearer <token>``, or basic auth with :attr:`username` and
    #: :attr:`password`; without either the ingress refuses to start.
    token: Secret = Secret("")
    username: str | None = None
    password: Secret = Secret("")
    max_request_bytes: int = DEFAULT_INGRESS_MAX_BYTES

    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in (self.token.reveal(), self.password.reveal()) if v)


@dataclass(frozen=True)
class ArchiveSettings:
    """Bounds of the event archive (:mod:`vebaq.core.archive`), each per vCenter: the oldest
    events go first when any bound is reached."""

    enabled: bool = True
    #: Seconds an event is kept, by its creation time. At most the done markers' lifetime
    #: (:data:`~vebaq.core.done.DONE_TTL`): an older event replayed without ``--force`` would
    #: otherwise run again.
    max_age: float = 7 * 86400.0
    #: Events kept.
    max_entries: int = 1_000_000
    #: Bytes of archived events kept (their JSON plus Redis' per-entry overhead, as measured with
    #: ``MEMORY USAGE``); the default holds about 240,000 vCenter events.
    max_bytes: int = 256 * 2**20


@dataclass(frozen=True)
class Settings:
    #: ``redis://…``, or ``sentinel://…;sentinel://…`` (Redis Sentinel, with
    #: :attr:`broker_master_name`).
    broker_url: str = DEFAULT_BROKER_URL
    #: With a ``sentinel://`` broker URL: the name of the master the Sentinels monitor.
    broker_master_name: str = ""
    #: With a ``sentinel://`` broker URL: the Sentinels' own password (``requirepass`` of
    #: redis-sentinel), if they ask for one; the master's is the URL's.
    sentinel_password: Secret = Secret("")
    #: Seconds after delivery before an unacked task (its worker died) goes back to its queue.
    #: Retries never wait in worker memory, so this only has to exceed the longest task run.
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    #: A "task-sent" event per message, so that Flower shows each task's queue and the tasks
    #: still waiting in it; costs a second publish per task.
    task_sent_events: bool = True
    #: The vCenters to read, at least one (``vcenters``, or the single ``vcenter`` section).
    vcenters: tuple[VCenterSettings, ...] = (VCenterSettings(),)
    vrops: VropsSettings = field(default_factory=VropsSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    #: ``router`` (com.vmware.event.router/event …) or ``vsphere`` (com.vmware.vsphere.X.v0).
    cloudevent_type: str = "router"
    triggers: tuple[Trigger, ...] = DEFAULT_TRIGGERS
    retry: Mapping[str, RetryPolicy] = field(default_factory=dict)
    #: The HTTP pools: pool name → its sink (``pools.<pool>.sink``).
    sinks: Mapping[str, SinkSettings] = field(default_factory=dict)
    ingress: IngressSettings = field(default_factory=IngressSettings)
    #: Per pool, as configured and resolved (:meth:`pool_limits` gives every pool's).
    limits: Mapping[str, PoolLimits] = field(default_factory=dict)
    #: Extra modules that register functions (imported by producer and workers alike).
    functions: tuple[str, ...] = ()
    #: Where the settings came from (the file's path, or ``config``), for error messages.
    source: str = "config"
    #: ``triggers`` came from the defaults, not the file (see :func:`check_pools`).
    default_triggers: bool = True

    def __post_init__(self) -> None:
        # Every Redis client of this process made from the broker URL (vebaq.core.redisdb)
        # needs the master name and Sentinel password that a sentinel:// URL does not carry.
        if is_sentinel(self.broker_url) and self.broker_master_name:
            register_sentinel(self.broker_url, SentinelOptions(self.broker_master_name,
                                                               self.sentinel_password))

    @property
    def vcenter(self) -> VCenterSettings:
        """The first (with the single ``vcenter`` section, the only) vCenter."""
        return self.vcenters[0]

    def retry_policy(self, pool: str) -> RetryPolicy:
        return self.retry.get(pool, RetryPolicy())

    def pool_limits(self, pool: str) -> PoolLimits:
        """The pool's :class:`PoolLimits`, time limits resolved (read for every task)."""
        limits = self.limits.get(pool)
        return limits if limits is not None else _default_limits(self.visibility_timeout)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for scrubbing free text."""
        values = [*(vc.password.reveal() for vc in self.vcenters), self.vrops.password.reveal(),
                  *self.ingress.secrets()]
        for sink in self.sinks.values():
            values.extend(sink.secrets())
        values.append(self.sentinel_password.reveal())
        values.append(broker_password(self.broker_url) or "")
        return tuple(v for v in values if v)

    def __repr__(self) -> str:
        vcenters = ", ".join(repr(vc.url) for vc in self.vcenters)
        return (f"Settings(broker_url={redact_url(self.broker_url)!r}, vcenters=[{vcenters}], "
                f"vrops={self.vrops!r}, triggers={len(self.triggers)})")


# --- value parsers: each takes (raw value, dotted path) and raises ConfigError naming the path

def _string(raw: Any, path: str) -> str:
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise ConfigError(f"{path}: expected a string, got {type(raw).__name__}")
    return str(raw)


def _secret(raw: Any, path: str) -> Secret:
    return Secret(_string(raw, path))


def _secret_from(environ: Mapping[str, str]) -> Callable[[Any, str], Secret]:
    """A parser of a secret given literally or as ``{env: NAME}`` (read from ``environ``)."""
    def parse(raw: Any, path: str) -> Secret:
        if isinstance(raw, Mapping):
            if set(raw) != {"env"} or not isinstance(raw["env"], str) or not raw["env"]:
                raise ConfigError(f"{path}: expected a string or {{env: VARIABLE_NAME}}")
            name = raw["env"]
            if not environ.get(name):
                raise ConfigError(f"{path}.env: environment variable {name} is not set")
            return Secret(environ[name])
        return _secret(raw, path)
    return parse


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2}


def _size(raw: Any, path: str) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"1MiB"`` or ``"2MB"``."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(raw)) if not isinstance(raw, bool) \
        else None
    if match and match.group(2).lower() in _SIZE_UNITS:
        return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ConfigError(f"{path}: expected a size such as 1048576, 512KiB or 1MiB, got {raw!r}")


def _boolean(raw: Any, path: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("false", "0", "no", "off", ""):
        return False
    raise ConfigError(f"{path}: expected true or false, got {raw!r}")


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000 ** 2, "mib": 1024 ** 2,
               "gb": 1000 ** 3, "gib": 1024 ** 3}


def parse_bytes(raw: Any, path: str) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"1MiB"``, ``"2MB"`` (KB/MB/GB are powers of
    1000, KiB/MiB/GiB of 1024)."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    if isinstance(raw, str):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", raw.strip())
        if match and match.group(2).lower() in _BYTE_UNITS:
            return int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])
    raise ConfigError(f"{path}: expected a size such as 1048576, 512KiB or 1MiB, got {raw!r}")


def _positive_int(raw: Any, path: str) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected a whole number, got {raw!r}") from None
    if isinstance(raw, bool) or value < 0 or (isinstance(raw, float) and raw != value):
        raise ConfigError(f"{path}: expected a whole number ≥ 0, got {raw!r}")
    return value


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ISO_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def parse_duration(raw: Any, path: str) -> float:
    """Seconds from ``2.5``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"`` or ISO 8601
    ``"PT2S"`` (Knative's ``backoffDelay``)."""
    if isinstance(raw, int | float) and not isinstance(raw, bool) and raw >= 0:
        return float(raw)
    if isinstance(raw, str):
        text = raw.strip()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", text)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2) or "s"]
        iso = _ISO_DURATION.match(text.upper())
        if iso and text.upper() not in ("P", "PT"):
            parts = {k: float(v) for k, v in iso.groupdict().items() if v}
            return (parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600
                    + parts.get("m", 0) * 60 + parts.get("s", 0))
    raise ConfigError(f"{path}: expected a duration such as 30s, 5m or PT2S, got {raw!r}")


def _choice(*options: str) -> Callable[[Any, str], str]:
    def parse(raw: Any, path: str) -> str:
        if raw not in options:
            raise ConfigError(f"{path}: expected one of {', '.join(options)}, got {raw!r}")
        return raw
    return parse


def broker_password(url: str) -> str | None:
    """The Redis password in a broker URL (for a Sentinel URL, the master's), if any."""
    try:
        if is_sentinel(url):
            return parse_sentinel_url(url).password
        return urlsplit(url).password
    except ValueError:
        return None


def check_broker_url(url: str, path: str = "broker.url") -> str:
    """Refuse anything but a well-formed ``redis://``/``rediss://`` URL, or kombu's
    ``sentinel://host:port;sentinel://host2:port2[/db]`` (Redis Sentinel), without echoing a
    password."""
    if is_sentinel(url):
        try:
            normalise_sentinel_url(url)
        except ValueError as exc:
            raise ConfigError(f"{path}: malformed Sentinel URL {redact_url(url)!r}: {exc} "
                              "(expected sentinel://[:password@]host:port;sentinel://host2:port2"
                              "[/db])") from None
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{path}: malformed broker URL {redact_url(url)!r}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{path}: expected redis://[:password@]host[:port][/db] or "
                          f"sentinel://host:port;sentinel://host2:port2, got {redact_url(url)!r}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"{path}: the database in {redact_url(url)!r} must be a number")
    del port
    return url


def _check_web_url(url: str, path: str, expected: str) -> str:
    """An ``http(s)://host…`` URL, refused (naming ``expected``) without echoing a password."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{path}: malformed URL {redact_url(url)!r}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{path}: expected {expected}, got {redact_url(url)!r}")
    return url


def check_http_url(url: str, path: str) -> str:
    """A sink's URL."""
    return _check_web_url(url, path, "an http:// or https:// URL")


def check_sdk_url(url: str, path: str) -> str:
    """A vCenter's SDK URL."""
    return _check_web_url(url, path, "https://<vcenter>/sdk")


def normalise_sdk_url(url: str) -> str:
    """One spelling per vCenter endpoint: scheme and host in lower case, no default port, no
    trailing slash, ``/sdk`` when the path is empty (``HTTPS://VC01.example.com:443/sdk/`` →
    ``https://vc01.example.com/sdk``). Two configured vCenters with the same normalised URL are
    one vCenter; the producer lease is named by it (:mod:`producer.lease`)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = parts.port
    if port is not None and port != {"https": 443, "http": 80}.get(scheme):
        host = f"{host}:{port}"
    path = parts.path.rstrip("/") or "/sdk"
    return f"{scheme}://{host}{path}"


# --- sections: file key → (dataclass field, parser)

_VCENTER = {
    "url": ("url", lambda raw, path: check_sdk_url(_string(raw, path), path)),
    "address": ("url", lambda raw, path: check_sdk_url(_string(raw, path), path)),  # VEBA's name
    "username": ("username", _string),
    "password": ("password", _secret),
    "insecureSSL": ("insecure_ssl", _boolean),
    "caBundle": ("ca_bundle", _string),
    "pollInterval": ("poll_interval", parse_duration),
    "maxPollInterval": ("max_poll_interval", parse_duration),
    "pageSize": ("page_size", _positive_int),
    "requestTimeout": ("request_timeout", parse_duration),
    "notifications": ("notifications", _boolean),
    "pushdown": ("pushdown", _boolean),
}
_VROPS = {
    "url": ("url", _string),
    "username": ("username", _string),
    "password": ("password", _secret),
    "authSource": ("auth_source", _string),
    "insecureSSL": ("insecure_ssl", _boolean),
    "caBundle": ("ca_bundle", _string),
    "timeout": ("timeout", parse_duration),
}
_RETRY = {
    "retry": ("max_retries", _positive_int),
    "maxRetries": ("max_retries", _positive_int),
    "backoffPolicy": ("backoff", _choice("exponential", "linear")),
    "backoffDelay": ("initial_delay", parse_duration),
    "initialDelay": ("initial_delay", parse_duration),
    "maxDelay": ("max_delay", parse_duration),
    "maxRetryAfter": ("max_retry_after", parse_duration),
    "jitter": ("jitter", _boolean),
}
_ARCHIVE = {
    "enabled": ("enabled", _boolean),
    "maxAge": ("max_age", parse_duration),
    "maxEntries": ("max_entries", _positive_int),
    "maxBytes": ("max_bytes", parse_bytes),
}
#: Smallest ``archive.maxBytes``: a few hundred events.
MIN_ARCHIVE_BYTES = 2**20

#: A header name (RFC 9110 token characters).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

#: Headers vebaq sets itself on a sink request (the CloudEvent's, and the auth it is given).
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "authorization"})


def _parse_sink(raw: Any, path: str, environ: Mapping[str, str]) -> SinkSettings:
    """``pools.<pool>.sink``: a URL string, or a mapping (see :class:`SinkSettings`)."""
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a URL or a mapping with url, mode, timeout, …")
    if "url" not in raw:
        raise ConfigError(f"{path}.url: missing (the URL events are POSTed to)")
    secret = _secret_from(environ)
    fields: dict[str, tuple[str, Callable]] = {
        "url": ("url", lambda v, p: check_http_url(_string(v, p), p)),
        "mode": ("mode", _choice(*SINK_MODES)),
        "encoding": ("mode", _choice(*SINK_MODES)),  # the VEBA router's name
        "timeout": ("timeout", parse_duration),
        "concurrency": ("concurrency", _positive_int),
        "caBundle": ("ca_bundle", _string),
        "insecureSSL": ("insecure_ssl", _boolean),
        "token": ("token", secret),
        "username": ("username", _string),
        "password": ("password", secret),
        "reply": ("reply", _choice(*SINK_REPLIES)),
    }
    plain = {k: v for k, v in raw.items() if k != "headers"}  # parsed below
    # (``headers`` is listed only so that an unknown key's message names it.)
    sink = _apply(SinkSettings(url=""), plain, {**fields, "headers": ("headers", None)}, path)
    headers = raw.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{path}.headers: expected a mapping of header name to value")
    parsed: list[tuple[str, str | Secret]] = []
    for name, value in headers.items():
        where = f"{path}.headers.{name}"
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ConfigError(f"{where}: not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS or name.lower().startswith("ce-"):
            raise ConfigError(f"{where}: set by vebaq itself (use token or username/password "
                              f"for Authorization)")
        text = secret(value, where) if isinstance(value, Mapping) else _string(value, where)
        shown = text.reveal() if isinstance(text, Secret) else text
        if "\r" in shown or "\n" in shown:
            raise ConfigError(f"{where}: a header value cannot contain a line break")
        parsed.append((name, text))
    sink = replace(sink, headers=tuple(parsed))
    if sink.timeout <= 0:
        raise ConfigError(f"{path}.timeout: must be > 0")
    if sink.concurrency < 1:
        raise ConfigError(f"{path}.concurrency: must be ≥ 1")
    if sink.token and (sink.username or sink.password):
        raise ConfigError(f"{path}: token and username/password both set (choose one)")
    if bool(sink.username) != bool(sink.password):
        raise ConfigError(f"{path}: basic auth needs both username and password")
    return sink


def _parse_ingress(raw: Mapping[str, Any], environ: Mapping[str, str]) -> IngressSettings:
    secret = _secret_from(environ)
    fields: dict[str, tuple[str, Callable]] = {
        "bind": ("bind", _string),
        "port": ("port", _positive_int),
        "path": ("path", _string),
        "token": ("token", secret),
        "username": ("username", _string),
        "password": ("password", secret),
        "maxRequestBytes": ("max_request_bytes", _size),
    }
    ingress = _apply(IngressSettings(), raw, fields, "ingress")
    if not 0 < ingress.port < 65536:
        raise ConfigError(f"ingress.port: must be between 1 and 65535, got {ingress.port}")
    if not ingress.path.startswith("/"):
        raise ConfigError(f"ingress.path: must start with '/', got {ingress.path!r}")
    if ingress.max_request_bytes < 1024:
        raise ConfigError("ingress.maxRequestBytes: must be at least 1KiB")
    if ingress.token and (ingress.username or ingress.password):
        raise ConfigError("ingress: token and username/password both set (choose one)")
    if bool(ingress.username) != bool(ingress.password):
        raise ConfigError("ingress: basic auth needs both username and password")
    return ingress


_LIMITS = {
    "maxDeliveries": ("max_deliveries", _positive_int),
    "maxEventBytes": ("max_event_bytes", parse_bytes),
    "softTimeLimit": ("soft_time_limit", parse_duration),
    "timeLimit": ("time_limit", parse_duration),
}
#: Keys of the ``broker`` section (parsed in :func:`_build`).
_BROKER = ("url", "masterName", "sentinelPassword", "visibilityTimeout", "taskSentEvents")
_TOP_LEVEL = ("broker", "vcenter", "vcenters", "archive", "cloudevents", "functions", "triggers",
              "pools", "vrops", "ingress", "apiVersion", "kind")

#: Environment variables → (section, file key). Env wins over the file.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "VEBAQ_VISIBILITY_TIMEOUT": ("broker", "visibilityTimeout"),
    "VEBAQ_TASK_SENT_EVENTS": ("broker", "taskSentEvents"),
    "VEBAQ_BROKER_MASTER_NAME": ("broker", "masterName"),
    "VEBAQ_SENTINEL_PASSWORD": ("broker", "sentinelPassword"),
    "VCENTER_URL": ("vcenter", "url"),
    "VCENTER_USER": ("vcenter", "username"),
    "VCENTER_PASSWORD": ("vcenter", "password"),
    "VCENTER_INSECURE_SSL": ("vcenter", "insecureSSL"),
    "VCENTER_CA_BUNDLE": ("vcenter", "caBundle"),
    "VCENTER_POLL_INTERVAL": ("vcenter", "pollInterval"),
    "VCENTER_REQUEST_TIMEOUT": ("vcenter", "requestTimeout"),
    "VCENTER_NOTIFICATIONS": ("vcenter", "notifications"),
    "VCENTER_PUSHDOWN": ("vcenter", "pushdown"),
    "VEBAQ_ARCHIVE": ("archive", "enabled"),
    "VEBAQ_ARCHIVE_MAX_AGE": ("archive", "maxAge"),
    "VEBAQ_ARCHIVE_MAX_ENTRIES": ("archive", "maxEntries"),
    "VEBAQ_ARCHIVE_MAX_BYTES": ("archive", "maxBytes"),
    "VEBAQ_INGRESS_PORT": ("ingress", "port"),
    "VEBAQ_INGRESS_TOKEN": ("ingress", "token"),
    "VEBAQ_INGRESS_USERNAME": ("ingress", "username"),
    "VEBAQ_INGRESS_PASSWORD": ("ingress", "password"),
    "VEBAQ_INGRESS_MAX_REQUEST_BYTES": ("ingress", "maxRequestBytes"),
    "VROPS_URL": ("vrops", "url"),
    "VROPS_USER": ("vrops", "username"),
    "VROPS_PASSWORD": ("vrops", "password"),
    "VROPS_AUTH_SOURCE": ("vrops", "authSource"),
    "VROPS_INSECURE_SSL": ("vrops", "insecureSSL"),
    "VROPS_CA_BUNDLE": ("vrops", "caBundle"),
    # The secret keys of the VEBA walkthrough's vROps functions.
    "vropsFqdn": ("vrops", "url"),
    "vropsUser": ("vrops", "username"),
    "vropsPassword": ("vrops", "password"),
}


def _vcenter_fields(environ: Mapping[str, str]) -> dict[str, tuple[str, Callable]]:
    return {**_VCENTER, "password": ("password", _secret_from(environ))}


def _with_checkpoint(vcenter: VCenterSettings, checkpoint: Any, path: str) -> VCenterSettings:
    if not isinstance(checkpoint, Mapping) or set(checkpoint) - {"maxAge"}:
        raise ConfigError(f"{path}.checkpoint: expected a mapping with maxAge only")
    if "maxAge" not in checkpoint:
        return vcenter
    return replace(vcenter, checkpoint_max_age=parse_duration(checkpoint["maxAge"],
                                                              f"{path}.checkpoint.maxAge"))


def _check_vcenter(vcenter: VCenterSettings) -> VCenterSettings:
    path = vcenter.where
    if vcenter.page_size < 1 or vcenter.page_size > 1000:
        raise ConfigError(f"{path}.pageSize: must be between 1 and 1000, got {vcenter.page_size}")
    if vcenter.request_timeout <= 0:
        raise ConfigError(f"{path}.requestTimeout: must be > 0")
    if vcenter.poll_interval <= 0 or vcenter.max_poll_interval < vcenter.poll_interval:
        raise ConfigError(f"{path}.pollInterval: must be > 0 and ≤ {path}.maxPollInterval")
    return vcenter


def _parse_vcenters(raw: Any, defaults_raw: dict[str, Any], checkpoint: Any,
                    environ: Mapping[str, str]) -> tuple[VCenterSettings, ...]:
    """``vcenters`` (each entry on top of the ``vcenter`` section and ``VCENTER_*``), or the
    ``vcenter`` section alone as a list of one."""
    fields = _vcenter_fields(environ)
    defaults = _with_checkpoint(_apply(VCenterSettings(), defaults_raw, fields, "vcenter"),
                                checkpoint or {}, "vcenter")
    if raw is None:
        return (_check_vcenter(defaults),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("vcenters: expected a list of vCenters, each with at least a url")
    if defaults.url:
        source = "VCENTER_URL" if environ.get("VCENTER_URL") else "vcenter.url"
        raise ConfigError(f"{source}: set next to vcenters (list every vCenter under vcenters, "
                          f"or configure one in vcenter)")
    vcenters: list[VCenterSettings] = []
    first_at: dict[str, str] = {}
    for i, entry in enumerate(raw):
        path = f"vcenters[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{path}: expected a mapping with url, username, password, …")
        entry = dict(entry)
        entry_checkpoint = entry.pop("checkpoint", None) or {}
        if not (entry.get("url") or entry.get("address")):
            raise ConfigError(f"{path}.url: missing (https://<vcenter>/sdk)")
        vcenter = _with_checkpoint(_apply(replace(defaults, where=path), entry, fields, path),
                                   entry_checkpoint, path)
        identity = normalise_sdk_url(vcenter.url)
        if identity in first_at:
            raise ConfigError(f"{path}.url: the same vCenter as {first_at[identity]} "
                              f"({identity}); list each vCenter once")
        first_at[identity] = path
        vcenters.append(_check_vcenter(vcenter))
    return tuple(vcenters)


def _apply(obj: Any, raw: Any, fields: dict[str, tuple[str, Callable]], path: str) -> Any:
    if raw is None:
        return obj
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
    changes = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown key (expected one of "
                              f"{', '.join(sorted(fields))})")
        attribute, parse = fields[key]
        changes[attribute] = parse(value, f"{path}.{key}")
    return replace(obj, **changes)


def _parse_triggers(raw: Any) -> tuple[Trigger, ...]:
    if not isinstance(raw, list):
        raise ConfigError("triggers: expected a list")
    triggers = []
    for i, item in enumerate(raw):
        path = f"triggers[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{path}: expected a mapping with name, pool and filters")
        unknown = set(item) - {"name", "pool", "filters", "throttle"}
        if unknown:
            raise ConfigError(f"{path}.{sorted(unknown)[0]}: unknown key "
                              f"(expected name, pool, filters, throttle)")
        if "pool" not in item:
            raise ConfigError(f"{path}.pool: missing (the worker pool that gets these events)")
        pool = _string(item["pool"], f"{path}.pool")
        filters = item.get("filters") or []
        if not isinstance(filters, list):
            raise ConfigError(f"{path}.filters: expected a list of filters")
        triggers.append(Trigger(
            name=_string(item.get("name", pool), f"{path}.name"), pool=pool,
            filters=tuple(parse_filter(f, f"{path}.filters[{j}]") for j, f in enumerate(filters)),
            throttle=(parse_throttle(item["throttle"], f"{path}.throttle", parse_duration)
                      if item.get("throttle") is not None else None),
        ))
    names = [t.name for t in triggers]
    for i, trigger in enumerate(triggers):
        if trigger.throttle is not None and names.count(trigger.name) > 1:
            # The throttle's state in Redis is kept under the trigger's name.
            raise ConfigError(f"triggers[{i}].name: {trigger.name!r} is used by another "
                              f"trigger; a throttled trigger needs a name of its own")
    return tuple(triggers)


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
         known_pools: set[str] | None = None) -> Settings:
    """Read the settings.

    :param path: the YAML file; defaults to ``$VEBAQ_CONFIG``; none is fine.
    :param environ: the environment to read (``os.environ`` by default).
    :param known_pools: pool names a trigger may use; ``None`` skips that check.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("VEBAQ_CONFIG") or None
    raw: dict[str, Any] = {}
    where = "config"
    if path:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such configuration file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"{where}: not valid YAML{line}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
        raw = loaded or {}
    try:
        settings = _build(raw, environ)
    except ConfigError as exc:
        raise ConfigError(one_line(f"{where}: {exc}")) from None
    settings = replace(settings, source=where)
    return settings if known_pools is None else check_pools(settings, known_pools)


def check_pools(settings: Settings, known_pools: set[str]) -> Settings:
    """Refuse triggers and pool sections naming a pool no function module registers (events
    sent there would wait for a worker that never comes); default triggers for pools that do
    not exist are dropped instead."""
    known = ", ".join(sorted(known_pools))
    if settings.default_triggers:
        triggers = tuple(t for t in settings.triggers if t.pool in known_pools)
    else:
        triggers = settings.triggers
        for i, trigger in enumerate(triggers):
            if trigger.pool not in known_pools:
                raise ConfigError(one_line(f"{settings.source}: triggers[{i}].pool: unknown pool "
                                           f"{trigger.pool!r} (known pools: {known})"))
    for pool in {**settings.retry, **settings.limits}:
        if pool not in known_pools:
            raise ConfigError(one_line(f"{settings.source}: pools.{pool}: unknown pool "
                                       f"(known pools: {known})"))
    return replace(settings, triggers=triggers)


def _build(raw: dict[str, Any], environ: Mapping[str, str]) -> Settings:
    for key in raw:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{key}: unknown key (expected one of {', '.join(_TOP_LEVEL)})")
    sections: dict[str, dict[str, Any]] = {}
    for name in ("broker", "vcenter", "vrops", "archive", "cloudevents", "pools", "ingress"):
        value = raw.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        sections[name] = dict(value or {})
    vcenter_raw = sections["vcenter"]
    checkpoint = vcenter_raw.pop("checkpoint", None) or {}
    for env_name, (section, key) in ENVIRONMENT.items():
        if environ.get(env_name):
            sections[section][key] = environ[env_name]

    broker = sections["broker"]
    unknown = set(broker) - set(_BROKER)
    if unknown:
        raise ConfigError(f"broker.{sorted(unknown)[0]}: unknown key "
                          f"(expected one of {', '.join(_BROKER)})")
    visibility_timeout = parse_duration(broker.get("visibilityTimeout",
                                                   DEFAULT_VISIBILITY_TIMEOUT),
                                        "broker.visibilityTimeout")
    if visibility_timeout <= 0:
        raise ConfigError("broker.visibilityTimeout: must be > 0")
    task_sent_events = _boolean(broker.get("taskSentEvents", True), "broker.taskSentEvents")
    broker_url = environ.get("VEBAQ_BROKER_URL") or broker.get("url") or DEFAULT_BROKER_URL
    check_broker_url(_string(broker_url, "broker.url"),
                     "VEBAQ_BROKER_URL" if environ.get("VEBAQ_BROKER_URL") else "broker.url")
    if is_sentinel(broker_url):  # the same password and database on each alternative (kombu)
        broker_url = normalise_sentinel_url(broker_url)
    master_name = _string(broker.get("masterName", ""), "broker.masterName").strip()
    sentinel_password = _secret_from(environ)(broker.get("sentinelPassword", ""),
                                              "broker.sentinelPassword")
    if is_sentinel(broker_url) and not master_name:
        raise ConfigError("broker.masterName: required with a sentinel:// broker URL (the name "
                          "of the master the Sentinels monitor; or VEBAQ_BROKER_MASTER_NAME)")
    if not is_sentinel(broker_url) and (master_name or sentinel_password):
        raise ConfigError(f"broker.{'masterName' if master_name else 'sentinelPassword'}: only "
                          "for a sentinel:// broker URL")

    vcenters = _parse_vcenters(raw.get("vcenters"), vcenter_raw, checkpoint, environ)
    vrops = _apply(VropsSettings(), sections["vrops"], _VROPS, "vrops")
    if vrops.url and "://" not in vrops.url:  # the walkthrough's vropsFqdn is a bare host name
        vrops = replace(vrops, url=f"https://{vrops.url}")

    archive = _apply(ArchiveSettings(), sections["archive"], _ARCHIVE, "archive")
    if not 0 < archive.max_age <= DONE_TTL:
        raise ConfigError(f"archive.maxAge: must be > 0 and at most {DONE_TTL // 86400:.0f}d, "
                          f"how long done markers are kept (an older event replayed without "
                          f"--force would run again), got {archive.max_age:g}s")
    if archive.max_entries < 1:
        raise ConfigError("archive.maxEntries: must be at least 1 (archive.enabled: false turns "
                          "the archive off)")
    if archive.max_bytes < MIN_ARCHIVE_BYTES:
        raise ConfigError(f"archive.maxBytes: must be at least 1MiB, got {archive.max_bytes}")

    ce = sections["cloudevents"]
    unknown = set(ce) - {"type"}
    if unknown:
        raise ConfigError(f"cloudevents.{sorted(unknown)[0]}: unknown key (expected type)")
    cloudevent_type = _choice("router", "vsphere")(
        environ.get("VEBAQ_CLOUDEVENT_TYPE") or ce.get("type", "router"), "cloudevents.type")

    functions_raw = raw.get("functions") or []
    if isinstance(functions_raw, str):
        functions_raw = [functions_raw]
    if not isinstance(functions_raw, list):
        raise ConfigError("functions: expected a list of Python module names")
    functions = [_string(m, f"functions[{i}]") for i, m in enumerate(functions_raw)]
    functions += [m for m in environ.get("VEBAQ_FUNCTIONS", "").split(",") if m.strip()]

    retry, limits, sinks = {}, {}, {}
    for pool, pool_raw in sections["pools"].items():
        pool_raw = pool_raw or {}
        allowed = {"sink", *_RETRY, *_LIMITS}
        if not isinstance(pool_raw, Mapping) or set(pool_raw) - allowed:
            # A pool section holds the retry keys (Knative style), the limits, maybe a sink.
            extra = sorted(set(pool_raw) - allowed) if isinstance(
                pool_raw, Mapping) else ["<not a mapping>"]
            raise ConfigError(f"pools.{pool}.{extra[0]}: unknown key "
                              f"(expected one of {', '.join(sorted(allowed))})")
        path = f"pools.{pool}"
        if "sink" in pool_raw:
            sinks[str(pool)] = _parse_sink(pool_raw["sink"], f"{path}.sink", environ)
        retry[pool] = _apply(RetryPolicy(), {k: v for k, v in pool_raw.items() if k in _RETRY},
                             _RETRY, path)
        limits[pool] = _apply(PoolLimits(), {k: v for k, v in pool_raw.items() if k in _LIMITS},
                              _LIMITS, path).resolved(visibility_timeout, path)
    ingress = _parse_ingress(sections["ingress"], environ)

    triggers = DEFAULT_TRIGGERS
    if "triggers" in raw:
        triggers = _parse_triggers(raw["triggers"])

    return Settings(broker_url=broker_url, broker_master_name=master_name,
                    sentinel_password=sentinel_password, visibility_timeout=visibility_timeout,
                    task_sent_events=task_sent_events, vcenters=vcenters, vrops=vrops,
                    archive=archive, cloudevent_type=cloudevent_type, triggers=triggers,
                    retry=retry, limits=limits, sinks=sinks, ingress=ingress,
                    functions=tuple(m.strip() for m in functions),
                    default_triggers="triggers" not in raw)
