"""Configuration: file + env, and one clear error naming the key for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from vebaq.core import config
from vebaq.core.errors import ConfigError
from vebaq.core.routing import DEFAULT_TRIGGERS, Filter, Trigger, parse_filter, route
from vebaq.core.secrets import Secret, redact_url, scrub

POOLS = {"echo", "vrops", "tickets"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vebaq.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    settings = config.load(environ={})
    assert settings.broker_url == config.DEFAULT_BROKER_URL
    assert settings.triggers == DEFAULT_TRIGGERS
    assert settings.vcenter.insecure_ssl is False  # TLS verified unless told otherwise
    assert settings.cloudevent_type == "router"


def test_file_then_env(tmp_path: Path) -> None:
    path = write(tmp_path, """
apiVersion: vebaq/v1
broker: {url: "redis://:filepw@redis:6379/2"}
vcenter:
  address: https://vc.example.com/sdk
  username: administrator@vsphere.local
  password: file-password
  pollInterval: 500ms
  checkpoint: {maxAge: 2h}
cloudevents: {type: vsphere}
triggers:
  - name: tickets
    pool: tickets
    filters:
      - prefix: {subject: Vm}
      - not: {suffix: {subject: Event}}
pools:
  tickets: {retry: 7, backoffPolicy: linear, backoffDelay: PT2S, maxDelay: 1m}
""")
    settings = config.load(path, environ={"VCENTER_PASSWORD": "env-password",
                                          "VCENTER_INSECURE_SSL": "true"}, known_pools=POOLS)
    assert settings.broker_url == "redis://:filepw@redis:6379/2"
    assert settings.vcenter.url == "https://vc.example.com/sdk"
    assert settings.vcenter.password.reveal() == "env-password"
    assert settings.vcenter.insecure_ssl is True
    assert settings.vcenter.poll_interval == 0.5
    assert settings.vcenter.checkpoint_max_age == 7200
    assert settings.cloudevent_type == "vsphere"
    policy = settings.retry_policy("tickets")
    assert (policy.max_retries, policy.backoff, policy.initial_delay, policy.max_delay) == \
        (7, "linear", 2.0, 60.0)
    assert route(settings.triggers, {"subject": "VmPoweredOn"}) == ["tickets"]
    assert route(settings.triggers, {"subject": "VmPoweredOnEvent"}) == []
    # Secrets show nowhere in the settings' repr.
    assert "filepw" not in repr(settings) and "env-password" not in repr(settings)
    assert set(settings.secrets()) == {"env-password", "filepw"}


def test_walkthrough_secret_names_configure_vrops() -> None:
    settings = config.load(environ={"vropsFqdn": "vrops.example.com", "vropsUser": "admin",
                                    "vropsPassword": "pw"})
    assert settings.vrops.url == "https://vrops.example.com"
    assert settings.vrops.username == "admin"
    assert settings.vrops.password == Secret("pw")


@pytest.mark.parametrize(("text", "message"), [
    ("vcenter: {pollIntervall: 1s}", "vcenter.pollIntervall: unknown key"),
    ("vcenter: {pollInterval: soon}", "vcenter.pollInterval: expected a duration"),
    ("vcenter: {insecureSSL: maybe}", "vcenter.insecureSSL: expected true or false"),
    ("vcenter: {pageSize: 5000}", "vcenter.pageSize: must be between 1 and 1000"),
    ("vcenter: {url: ftp://vc/sdk}", "vcenter.url: expected https://<vcenter>/sdk"),
    ("vcenter: [1, 2]", "vcenter: expected a mapping"),
    ("brokr: {}", "brokr: unknown key"),
    ("broker: {url: 'http://redis:6379'}", "broker.url: expected redis://"),
    ("broker: {url: 'redis://:pw@redis:notaport/0'}", "broker.url: malformed broker URL"),
    ("triggers: [{name: x, pool: nosuchpool}]", "triggers[0].pool: unknown pool 'nosuchpool'"),
    ("triggers: [{name: x}]", "triggers[0].pool: missing"),
    ("triggers: [{pool: echo, filters: [{exakt: {subject: A}}]}]",
     "triggers[0].filters[0]: unknown filter dialect 'exakt'"),
    ("triggers: [{pool: echo, filters: [{exact: {subject: 5}}]}]",
     "triggers[0].filters[0].exact.subject: expected a string"),
    ("pools: {vrops: {retries: 3}}", "pools.vrops.retries: unknown key"),
    ("pools: {vrops: {backoffPolicy: cubic}}", "pools.vrops.backoffPolicy: expected one of"),
    ("cloudevents: {type: cncf}", "cloudevents.type: expected one of router, vsphere"),
    ("archive: {maxAge: 30d}", "archive.maxAge: must be > 0 and at most 7d"),
    ("archive: {maxBytes: lots}", "archive.maxBytes: expected a size such as 1048576"),
    ("archive: {maxBytes: 64KiB}", "archive.maxBytes: must be at least 1MiB"),
    ("archive: {maxEntries: 0}", "archive.maxEntries: must be at least 1"),
    ("archive: {maxLength: 5}", "archive.maxLength: unknown key"),
    ("vcenter: {url: [unclosed", "not valid YAML (line 1)"),
    ("- just\n- a list", "expected a mapping at the top level"),
])
def test_bad_config_is_one_clear_error_naming_the_key(tmp_path: Path, text: str,
                                                     message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={}, known_pools=POOLS)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)
    assert "pw@" not in str(caught.value)


def test_malformed_broker_url_from_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="VEBAQ_BROKER_URL: malformed broker URL") as caught:
        config.load(environ={"VEBAQ_BROKER_URL": "redis://:topsecret@host:99999999/0"})
    assert "topsecret" not in str(caught.value)


def test_archive_bounds_from_file_and_env(tmp_path: Path) -> None:
    assert config.load(environ={}).archive == config.ArchiveSettings()
    path = write(tmp_path, "archive: {maxAge: 2d, maxEntries: 5000, maxBytes: 64MiB}\n")
    archive = config.load(path, environ={}).archive
    assert (archive.enabled, archive.max_age, archive.max_entries, archive.max_bytes) == \
        (True, 2 * 86400, 5000, 64 * 2**20)
    env = {"VEBAQ_ARCHIVE": "false", "VEBAQ_ARCHIVE_MAX_BYTES": "1GB",
           "VEBAQ_ARCHIVE_MAX_AGE": "12h", "VEBAQ_ARCHIVE_MAX_ENTRIES": "100"}
    archive = config.load(path, environ=env).archive
    assert (archive.enabled, archive.max_age, archive.max_entries, archive.max_bytes) == \
        (False, 12 * 3600, 100, 10**9)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        config.load("/nonexistent/vebaq.yaml", environ={})


@pytest.mark.parametrize(("raw", "seconds"), [
    (2, 2.0), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("PT2S", 2.0),
    ("PT1M30S", 90.0), ("P1D", 86400.0), ("1.5", 1.5),
])
def test_durations(raw: object, seconds: float) -> None:
    assert config.parse_duration(raw, "x") == seconds


def test_retry_delays_grow_and_are_capped() -> None:
    policy = config.RetryPolicy(max_retries=10, initial_delay=1, max_delay=8, jitter=False)
    assert [policy.delay(n, lambda: 0.0) for n in range(1, 6)] == [1, 2, 4, 8, 8]
    jittered = config.RetryPolicy(initial_delay=4, jitter=True)
    assert jittered.delay(1, lambda: 0.0) == 2 and jittered.delay(1, lambda: 0.999) < 4
    linear = config.RetryPolicy(initial_delay=2, backoff="linear", jitter=False)
    assert [linear.delay(n, lambda: 0.0) for n in (1, 2, 3)] == [2, 4, 6]


def test_filters() -> None:
    event = {"subject": "EnteredMaintenanceModeEvent", "type": "com.vmware.event.router/event"}
    assert Trigger("all", "echo").matches(event)  # no filters: everything
    assert parse_filter({"exact": {"subject": "EnteredMaintenanceModeEvent"}}, "f").matches(event)
    assert parse_filter({"prefix": {"type": "com.vmware.event.router/"}}, "f").matches(event)
    assert parse_filter({"suffix": {"subject": "ModeEvent"}}, "f").matches(event)
    assert not parse_filter({"exact": {"subject": "Other"}}, "f").matches(event)
    assert not parse_filter({"exact": {"missing": "x"}}, "f").matches(event)
    assert parse_filter({"all": [{"prefix": {"subject": "Entered"}},
                                 {"not": {"exact": {"subject": "x"}}}]}, "f").matches(event)
    assert route(DEFAULT_TRIGGERS, event) == ["echo", "vrops"]
    assert route(DEFAULT_TRIGGERS, {"subject": "VmPoweredOnEvent"}) == ["echo"]
    assert isinstance(DEFAULT_TRIGGERS[1].filters[0], Filter)


def test_secret_hides_itself_everywhere() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in f"{secret} {secret!r} {secret!s} {secret:>10}" + str([secret])
    assert secret.reveal() == "hunter2"
    assert redact_url("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert scrub("login hunter2 to https://u:hunter2@x/", ("hunter2",)) == \
        "login *** to https://u:***@x/"


# --- HTTP pools (pools.<pool>.sink) and the ingress

def test_sink_and_ingress_settings(tmp_path: Path) -> None:
    path = write(tmp_path, """
pools:
  tickets:
    retry: 3
    sink:
      url: https://fn.example/tickets
      mode: structured
      timeout: 2s
      concurrency: 4
      caBundle: /etc/ssl/fn-ca.pem
      headers: {X-Tenant: lab, X-Api-Key: {env: FN_KEY}}
      token: {env: FN_TOKEN}
      reply: enqueue
  knative: {sink: "http://kn-ps-echo.vmware-functions.svc/"}
  basic: {sink: {url: "https://fn.example/", encoding: binary, username: u, password: pw-basic}}
ingress: {port: 9000, path: /events, token: {env: IN_TOKEN}, maxRequestBytes: 256KiB}
""")
    env = {"FN_KEY": "key-from-env", "FN_TOKEN": "token-from-env", "IN_TOKEN": "ingress-tok"}
    settings = config.load(path, environ=env, known_pools=POOLS | {"knative", "basic"})
    tickets = settings.sinks["tickets"]
    assert (tickets.url, tickets.mode, tickets.timeout, tickets.concurrency, tickets.reply) == \
        ("https://fn.example/tickets", "structured", 2.0, 4, "enqueue")
    assert tickets.token.reveal() == "token-from-env" and tickets.ca_bundle == "/etc/ssl/fn-ca.pem"
    headers = dict(tickets.headers)
    assert headers["X-Tenant"] == "lab" and headers["X-Api-Key"] == Secret("key-from-env")
    assert settings.retry_policy("tickets").max_retries == 3
    knative = settings.sinks["knative"]
    assert (knative.mode, knative.timeout, knative.reply, knative.insecure_ssl) == \
        ("binary", 10.0, "ignore", False)  # Knative's default mode; TLS verified
    assert settings.sinks["basic"].password.reveal() == "pw-basic"
    assert settings.ingress.port == 9000 and settings.ingress.path == "/events"
    assert settings.ingress.max_request_bytes == 256 * 1024
    secrets = set(settings.secrets())
    assert {"key-from-env", "token-from-env", "ingress-tok", "pw-basic"} <= secrets
    assert "lab" not in secrets  # a literal header value is not a secret
    shown = repr(settings) + repr(settings.sinks) + repr(settings.ingress)
    assert not any(secret in shown for secret in secrets)


def test_ingress_credentials_from_the_environment() -> None:
    settings = config.load(environ={"VEBAQ_INGRESS_TOKEN": "t0ken", "VEBAQ_INGRESS_PORT": "8099"})
    assert settings.ingress.token == Secret("t0ken") and settings.ingress.port == 8099
    assert "t0ken" in settings.secrets()


@pytest.mark.parametrize(("text", "message"), [
    ("pools: {t: {sink: {mode: binary}}}", "pools.t.sink.url: missing"),
    ("pools: {t: {sink: {url: ftp://x/}}}", "pools.t.sink.url: expected an http:// or https://"),
    ("pools: {t: {sink: {url: 'https://u:pw@x:bad/'}}}", "pools.t.sink.url: malformed URL"),
    ("pools: {t: {sink: {url: https://x/, mode: xml}}}", "pools.t.sink.mode: expected one of"),
    ("pools: {t: {sink: {url: https://x/, timeot: 1s}}}", "pools.t.sink.timeot: unknown key"),
    ("pools: {t: {sink: {url: https://x/, timeout: 0}}}", "pools.t.sink.timeout: must be > 0"),
    ("pools: {t: {sink: {url: https://x/, concurrency: 0}}}", "pools.t.sink.concurrency: must be"),
    ("pools: {t: {sink: {url: https://x/, token: {env: NOT_SET}}}}",
     "pools.t.sink.token.env: environment variable NOT_SET is not set"),
    ("pools: {t: {sink: {url: https://x/, token: {file: /x}}}}",
     "pools.t.sink.token: expected a string or {env: VARIABLE_NAME}"),
    ("pools: {t: {sink: {url: https://x/, token: a, username: u, password: p}}}",
     "pools.t.sink: token and username/password both set"),
    ("pools: {t: {sink: {url: https://x/, username: u}}}", "basic auth needs both"),
    ("pools: {t: {sink: {url: https://x/, headers: {Authorization: x}}}}",
     "pools.t.sink.headers.Authorization: set by vebaq itself"),
    ("pools: {t: {sink: {url: https://x/, headers: {ce-id: x}}}}", "set by vebaq itself"),
    ("pools: {t: {sink: {url: https://x/, headers: {'bad header': x}}}}",
     "not a valid HTTP header name"),
    ("pools: {t: {sink: {url: https://x/, headers: {X-A: \"a\\r\\nInjected: 1\"}}}}",
     "pools.t.sink.headers.X-A: a header value cannot contain a line break"),
    ("pools: {t: {sinc: {url: https://x/}}}", "pools.t.sinc: unknown key"),
    ("ingress: {port: 70000}", "ingress.port: must be between 1 and 65535"),
    ("ingress: {path: events}", "ingress.path: must start with '/'"),
    ("ingress: {maxRequestBytes: lots}", "ingress.maxRequestBytes: expected a size"),
    ("ingress: {maxRequestBytes: 10}", "ingress.maxRequestBytes: must be at least 1KiB"),
    ("ingress: {token: a, username: u, password: p}", "ingress: token and username/password"),
    ("ingress: {tokn: a}", "ingress.tokn: unknown key"),
])
def test_bad_sink_or_ingress_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={}, known_pools=POOLS | {"t"})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and "pw@" not in str(caught.value)


def test_a_sink_pool_is_a_known_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker settings register a function per sink, so triggers may name the pool."""
    from workers.pools import POOLS as REGISTRY
    from workers.settings import load_settings

    path = write(tmp_path, """
triggers: [{pool: fn, filters: [{prefix: {subject: Vm}}]}]
pools: {fn: {sink: https://fn.example/, retry: 2}}
""")
    monkeypatch.delenv("VEBAQ_FUNCTIONS", raising=False)
    try:
        settings = load_settings(str(path))
        assert [f.name for f in REGISTRY["fn"]] == ["sink"]
        assert route(settings.triggers, {"subject": "VmPoweredOffEvent"}) == ["fn"]
    finally:
        REGISTRY.pop("fn", None)


# --- per-pool limits: the poison breaker, event size, time limits


def test_pool_limits_default_to_three_deliveries_1_mib_and_270_s() -> None:
    limits = config.load(environ={}).pool_limits("echo")
    assert (limits.max_deliveries, limits.max_event_bytes) == (3, 1024 * 1024)
    assert (limits.time_limit, limits.soft_time_limit) == (270.0, 243.0)


def test_default_time_limits_stay_below_a_short_visibility_timeout() -> None:
    limits = config.load(environ={"VEBAQ_VISIBILITY_TIMEOUT": "5"}).pool_limits("echo")
    assert limits.time_limit == 4.5 and limits.soft_time_limit == 4.05


def test_pool_limits_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "pools:\n  tickets: {retry: 2, maxDeliveries: 5, maxEventBytes: 512KiB,"
                           " softTimeLimit: 1m, timeLimit: 90s}\n")
    settings = config.load(path, environ={}, known_pools=POOLS)
    limits = settings.pool_limits("tickets")
    assert (limits.max_deliveries, limits.max_event_bytes) == (5, 512 * 1024)
    assert (limits.soft_time_limit, limits.time_limit) == (60.0, 90.0)
    assert settings.retry_policy("tickets").max_retries == 2


@pytest.mark.parametrize(("pool", "message"), [
    ("{timeLimit: 10m}", "pools.echo.timeLimit: must be > 0 and below broker.visibilityTimeout "
                         "(300s), got 600s"),
    ("{softTimeLimit: 60, timeLimit: 30}", "pools.echo.softTimeLimit: must be > 0 and below "
                                           "timeLimit (30s), got 60s"),
    ("{softTimeLimit: 280}", "pools.echo.softTimeLimit: 280s is not below the default timeLimit "
                             "(270s); set timeLimit too"),
    ("{maxDeliveries: 0}", "pools.echo.maxDeliveries: must be ≥ 1"),
    ("{maxEventBytes: lots}", "pools.echo.maxEventBytes: expected a size such as 1048576, "
                              "512KiB or 1MiB, got 'lots'"),
    ("{maxDelivery: 3}", "pools.echo.maxDelivery: unknown key (expected one of backoffDelay, "),
])
def test_bad_pool_limits_name_the_key(tmp_path: Path, pool: str, message: str) -> None:
    path = write(tmp_path, f"pools:\n  echo: {pool}\n")
    with pytest.raises(ConfigError) as raised:
        config.load(path, environ={}, known_pools=POOLS)
    assert message in str(raised.value)


def test_sentinel_broker_from_file_and_env(tmp_path: Path) -> None:
    from vebaq.core import broker, redisdb

    path = tmp_path / "vebaq.yaml"
    path.write_text("broker:\n  url: 'sentinel://:masterpw@s1:26379;sentinel://s2:26380/2'\n"
                    "  masterName: mymaster\n  sentinelPassword: {env: SENTINEL_PW}\n")
    settings = config.load(path, environ={"SENTINEL_PW": "sentinel-pw"})
    # Every alternative carries the password and database (kombu uses the one it tries).
    assert settings.broker_url == ("sentinel://:masterpw@s1:26379/2;"
                                   "sentinel://:masterpw@s2:26380/2")
    assert settings.broker_master_name == "mymaster"
    assert settings.sentinel_password == Secret("sentinel-pw")
    assert {"masterpw", "sentinel-pw"} <= set(settings.secrets())
    assert "masterpw" not in repr(settings) and "sentinel-pw" not in repr(settings)
    assert redisdb.sentinel_options(settings.broker_url).master_name == "mymaster"
    options = broker.celery_config(settings)["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"
    from_env = config.load(environ={"VEBAQ_BROKER_URL": "sentinel://h:1;sentinel://h:2",
                                    "VEBAQ_BROKER_MASTER_NAME": "other",
                                    "VEBAQ_SENTINEL_PASSWORD": "pw2"})
    assert from_env.broker_url == "sentinel://h:1/0;sentinel://h:2/0"
    assert from_env.sentinel_password.reveal() == "pw2"
    assert broker.celery_config(config.Settings())["broker_transport_options"].get(
        "master_name") is None


@pytest.mark.parametrize(("environ", "message"), [
    ({"VEBAQ_BROKER_URL": "sentinel://h:1;sentinel://h:2"},
     "broker.masterName: required with a sentinel:// broker URL"),
    ({"VEBAQ_BROKER_URL": "sentinel://:pw@h:1;redis://h:2", "VEBAQ_BROKER_MASTER_NAME": "m"},
     "VEBAQ_BROKER_URL: malformed Sentinel URL 'sentinel://:\\*\\*\\*@h:1;redis://h:2': "
     "alternative 2 is not sentinel://host"),
    ({"VEBAQ_BROKER_URL": "sentinel://h:1/1;sentinel://h:2/2", "VEBAQ_BROKER_MASTER_NAME": "m"},
     "the alternatives name different databases"),
    ({"VEBAQ_BROKER_URL": "sentinel://:pw@h:x", "VEBAQ_BROKER_MASTER_NAME": "m"},
     "malformed Sentinel URL"),
    ({"VEBAQ_BROKER_MASTER_NAME": "m"}, "broker.masterName: only for a sentinel:// broker URL"),
])
def test_bad_sentinel_settings_are_one_line(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config.load(environ=environ)
    assert "pw@" not in str(caught.value) and "\n" not in str(caught.value)


def test_sentinel_url_passwords_are_redacted_in_every_alternative() -> None:
    assert redact_url("sentinel://:a@h:1/0;sentinel://:b@h:2/0") == \
        "sentinel://:***@h:1/0;sentinel://:***@h:2/0"
