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
