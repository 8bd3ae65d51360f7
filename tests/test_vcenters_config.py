"""Several vCenters in the configuration: the ``vcenters`` list, the single ``vcenter`` section and
``VCENTER_*`` as a list of one, defaults, and one clear error naming the vCenter and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.vcenter import check
from vebaq.core import config
from vebaq.core.errors import ConfigError


def load(tmp_path: Path, text: str, **environ: str) -> config.Settings:
    path = tmp_path / "vebaq.yaml"
    path.write_text(text)
    return config.load(path, environ=environ)


def test_the_single_vcenter_section_and_env_are_a_list_of_one(tmp_path: Path) -> None:
    settings = config.load(environ={"VCENTER_URL": "https://vc.example.com/sdk",
                                    "VCENTER_USER": "u", "VCENTER_PASSWORD": "pw"})
    assert len(settings.vcenters) == 1
    assert settings.vcenter is settings.vcenters[0]
    assert (settings.vcenter.url, settings.vcenter.where) == ("https://vc.example.com/sdk",
                                                              "vcenter")
    settings = load(tmp_path, "vcenter: {url: 'https://vc1/sdk', pollInterval: 2s}\n")
    assert [vc.url for vc in settings.vcenters] == ["https://vc1/sdk"]
    assert config.load(environ={}).vcenters == (config.VCenterSettings(),)


def test_a_list_of_vcenters_with_defaults_and_their_own_keys(tmp_path: Path) -> None:
    settings = load(tmp_path, """
vcenter:
  username: reader@vsphere.local
  pollInterval: 2s
  maxPollInterval: 10s
  checkpoint: {maxAge: 3h}
vcenters:
  - url: https://vc01.example.com/sdk
    password: {env: VC01_PASSWORD}
  - url: https://vc02.example.com/sdk
    username: other@vsphere.local
    password: literal-password
    pollInterval: 500ms
    pageSize: 200
    requestTimeout: 5s
    notifications: false
    insecureSSL: true
    checkpoint: {maxAge: 30m}
  - address: http://127.0.0.1:8989/sdk
""", VC01_PASSWORD="from-env", VCENTER_PASSWORD="env-default", VCENTER_REQUEST_TIMEOUT="9s")
    one, two, three = settings.vcenters
    assert [vc.where for vc in settings.vcenters] == ["vcenters[0]", "vcenters[1]",
                                                      "vcenters[2]"]
    assert (one.username, one.password.reveal(), one.poll_interval, one.max_poll_interval,
            one.request_timeout, one.checkpoint_max_age) == (
        "reader@vsphere.local", "from-env", 2.0, 10.0, 9.0, 3 * 3600)
    assert (two.username, two.password.reveal(), two.poll_interval, two.page_size,
            two.request_timeout, two.notifications, two.insecure_ssl, two.checkpoint_max_age) \
        == ("other@vsphere.local", "literal-password", 0.5, 200, 5.0, False, True, 1800)
    assert (three.url, three.password.reveal()) == ("http://127.0.0.1:8989/sdk", "env-default")
    assert set(settings.secrets()) == {"from-env", "literal-password", "env-default"}
    shown = repr(settings)
    assert "vc02.example.com" in shown
    assert not any(secret in shown for secret in settings.secrets())


def test_an_empty_vcenter_url_is_unset(tmp_path: Path) -> None:
    """Compose passes VCENTER_URL= (empty, from .env) to turn the demo default off."""
    settings = load(tmp_path, "vcenters: [{url: 'https://a/sdk'}, {url: 'https://b/sdk'}]",
                    VCENTER_URL="", VCENTER_USER="reader", VCENTER_PASSWORD="pw")
    assert [(vc.url, vc.username) for vc in settings.vcenters] == [
        ("https://a/sdk", "reader"), ("https://b/sdk", "reader")]


@pytest.mark.parametrize(("text", "environ", "message"), [
    ("vcenters: []", {}, "vcenters: expected a list of vCenters"),
    ("vcenters: {url: x}", {}, "vcenters: expected a list of vCenters"),
    ("vcenters: [https://vc/sdk]", {}, "vcenters[0]: expected a mapping"),
    ("vcenters: [{username: u}]", {}, "vcenters[0].url: missing"),
    ("vcenters: [{url: 'https://a/sdk'}, {url: 'https://b/sdk', pollInterval: soon}]", {},
     "vcenters[1].pollInterval: expected a duration"),
    ("vcenters: [{url: 'https://a/sdk'}, {url: 'https://b/sdk', pollIntervall: 1s}]", {},
     "vcenters[1].pollIntervall: unknown key"),
    ("vcenters: [{url: 'https://a/sdk', pageSize: 5000}]", {},
     "vcenters[0].pageSize: must be between 1 and 1000"),
    ("vcenters: [{url: 'https://a/sdk', pollInterval: 9s}]", {},
     "vcenters[0].pollInterval: must be > 0 and ≤ vcenters[0].maxPollInterval"),
    ("vcenters: [{url: 'https://a/sdk', checkpoint: {age: 1h}}]", {},
     "vcenters[0].checkpoint: expected a mapping with maxAge only"),
    ("vcenters: [{url: 'ftp://a/sdk'}]", {}, "vcenters[0].url: expected https://<vcenter>/sdk"),
    ("vcenters: [{url: 'https://a:port/sdk'}]", {}, "vcenters[0].url: malformed URL"),
    ("vcenters: [{url: 'https://a/sdk', password: {env: NOPE}}]", {},
     "vcenters[0].password.env: environment variable NOPE is not set"),
    ("vcenters: [{url: 'https://vc.example.com/sdk'}, {url: 'https://b/sdk'}, "
     "{url: 'HTTPS://VC.example.com:443/sdk/'}]", {},
     "vcenters[2].url: the same vCenter as vcenters[0] (https://vc.example.com/sdk)"),
    ("vcenters: [{url: 'https://a/sdk'}]", {"VCENTER_URL": "https://b/sdk"},
     "VCENTER_URL: set next to vcenters"),
    ("vcenter: {url: 'https://b/sdk'}\nvcenters: [{url: 'https://a/sdk'}]", {},
     "vcenter.url: set next to vcenters"),
])
def test_a_bad_vcenter_is_one_line_naming_it_and_the_key(tmp_path: Path, text: str,
                                                         environ: dict[str, str],
                                                         message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **environ)
    assert str(caught.value) == str(caught.value).strip() and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'vebaq.yaml'}: {message}"), caught.value


@pytest.mark.parametrize(("url", "normal"), [
    ("https://vc.example.com/sdk", "https://vc.example.com/sdk"),
    ("HTTPS://VC.Example.COM:443/sdk/", "https://vc.example.com/sdk"),
    ("https://vc.example.com", "https://vc.example.com/sdk"),
    ("https://vc.example.com:8443/sdk", "https://vc.example.com:8443/sdk"),
    ("http://127.0.0.1:80/sdk", "http://127.0.0.1/sdk"),
    ("http://[::1]:8989/sdk", "http://[::1]:8989/sdk"),
])
def test_urls_are_normalised_for_identity(url: str, normal: str) -> None:
    assert config.normalise_sdk_url(url) == normal


def test_a_vcenter_without_credentials_is_refused_at_start_naming_it(tmp_path: Path) -> None:
    settings = load(tmp_path, "vcenters: [{url: 'https://a/sdk', username: u, password: p}, "
                              "{url: 'https://b/sdk', username: u}]")
    check(settings.vcenters[0])
    with pytest.raises(ConfigError, match=r"^vcenters\[1\]\.password: not set \(for https://b/"):
        check(settings.vcenters[1])
    with pytest.raises(ConfigError, match=r"^vcenter: set VCENTER_USER and VCENTER_PASSWORD"):
        check(config.load(environ={"VCENTER_URL": "https://a/sdk"}).vcenter)
    bundle = load(tmp_path, "vcenters: [{url: 'https://a/sdk', username: u, password: p, "
                            "caBundle: /nonexistent.pem}]")
    with pytest.raises(ConfigError, match=r"^vcenters\[0\]\.caBundle: cannot load"):
        check(bundle.vcenter)
