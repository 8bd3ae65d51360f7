"""The fake vROps behaves like the suite-api the ``vrops`` pool talks to (real HTTP)."""

from __future__ import annotations

import argparse
import time

import pytest
import requests

from vebaq.devtools.fake_vrops import (
    MAINTAINED,
    MAINTAINED_DELETE,
    MAINTAINED_PUT,
    RESOURCE_QUERY,
    STARTED,
    TOKEN_ACQUIRE,
    TOKEN_RELEASE,
    FakeVrops,
    parse_host,
)

VC = "8a6e3c41-1f0d-4c39-9a2e-5d7f0b1e2c3d"
QUERY = "/suite-api/api/adapterkinds/VMWARE/resourcekinds/HostSystem/resources"


@pytest.fixture
def fake():
    with FakeVrops([("esx1", "host-1", VC), ("esx10", "host-10", VC), ("ESX2", "host-2", VC)],
                   username="admin", password="s3cret-pw", token_ttl=60) as server:
        yield server


def acquire(fake: FakeVrops, password: str = "s3cret-pw") -> requests.Response:
    return requests.post(f"{fake.url}/suite-api/api/auth/token/acquire", timeout=5,
                         json={"username": "admin", "password": password})


def auth(token: str, scheme: str = "vRealizeOpsToken") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}", "Accept": "application/json"}


def query(fake: FakeVrops, token: str, name: str) -> requests.Response:
    return requests.get(f"{fake.url}{QUERY}", params={"name": name}, headers=auth(token),
                        timeout=5)


def test_token_acquire_and_bad_credentials(fake):
    answer = acquire(fake)
    assert answer.status_code == 200
    body = answer.json()
    assert body["token"] and body["expiresAt"].endswith("UTC")
    assert abs(body["validity"] / 1000 - (time.time() + 60)) < 5
    assert acquire(fake, password="wrong").status_code == 401
    assert requests.post(f"{fake.url}/suite-api/api/auth/token/acquire", json={},
                         timeout=5).status_code == 400


def test_auth_source_is_checked_when_configured():
    with FakeVrops(username="u", password="pw1", auth_source="ad") as fake:
        url = f"{fake.url}/suite-api/api/auth/token/acquire"
        assert requests.post(url, json={"username": "u", "password": "pw1"},
                             timeout=5).status_code == 401
        assert requests.post(url, json={"username": "u", "password": "pw1", "authSource": "ad"},
                             timeout=5).status_code == 200


def test_missing_bad_expired_and_released_tokens_get_401(fake):
    assert requests.get(f"{fake.url}{QUERY}", timeout=5).status_code == 401
    assert query(fake, "not-a-token", "esx").status_code == 401
    token = acquire(fake).json()["token"]
    assert query(fake, token, "esx").status_code == 200
    response = requests.get(f"{fake.url}{QUERY}", headers=auth(token, "OpsToken"), timeout=5)
    assert response.status_code == 200  # newer vROps scheme
    fake.expire_tokens()
    assert query(fake, token, "esx").status_code == 401
    token = acquire(fake).json()["token"]
    release = requests.post(f"{fake.url}/suite-api/api/auth/token/release",
                            headers=auth(token), timeout=5)
    assert release.status_code == 200
    assert query(fake, token, "esx").status_code == 401


def test_token_expires_after_its_ttl():
    with FakeVrops([("esx1", "host-1", VC)], token_ttl=0.3) as fake:
        token = acquire(fake, password="VMware1!").json()["token"]
        assert query(fake, token, "esx1").status_code == 200
        time.sleep(0.4)
        assert query(fake, token, "esx1").status_code == 401


def test_name_query_is_a_case_insensitive_substring_match(fake):
    token = acquire(fake).json()["token"]
    names = sorted(r["resourceKey"]["name"] for r in query(fake, token, "esx1")
                   .json()["resourceList"])
    assert names == ["esx1", "esx10"]  # not an exact match
    assert [r["resourceKey"]["name"] for r in query(fake, token, "esx2").json()["resourceList"]] \
        == ["ESX2"]
    assert query(fake, token, "nothing").json()["resourceList"] == []
    resource = query(fake, token, "esx10").json()["resourceList"][0]
    key = resource["resourceKey"]
    assert (key["adapterKindKey"], key["resourceKindKey"]) == ("VMWARE", "HostSystem")
    identifiers = {i["identifierType"]["name"]: i["value"] for i in key["resourceIdentifiers"]}
    assert identifiers == {"VMEntityObjectID": "host-10", "VMEntityVCID": VC,
                           "VMEntityName": "esx10"}
    assert resource["identifier"] == fake.resource_id("host-10", VC)
    assert resource["resourceStatusStates"][0]["resourceState"] == STARTED


def test_maintained_put_and_delete_change_the_resource_state(fake):
    token = acquire(fake).json()["token"]
    rid = fake.resource_id("host-1", VC)
    url = f"{fake.url}/suite-api/api/resources/{rid}/maintained"
    assert requests.put(url, headers=auth(token), timeout=5).status_code in (200, 204)
    assert fake.state(rid) == MAINTAINED
    shown = query(fake, token, "esx10").json()["resourceList"]
    assert [r["resourceStatusStates"][0]["resourceState"] for r in shown] == [STARTED]
    shown = [r for r in query(fake, token, "esx1").json()["resourceList"]
             if r["identifier"] == rid]
    assert shown[0]["resourceStatusStates"][0]["resourceState"] == MAINTAINED
    assert requests.delete(url, headers=auth(token), timeout=5).status_code in (200, 204)
    assert fake.state(rid) == STARTED
    assert [(c.method, c.before, c.after) for c in fake.history] == [
        ("PUT", STARTED, MAINTAINED), ("DELETE", MAINTAINED, STARTED)]
    missing = requests.put(f"{fake.url}/suite-api/api/resources/nope/maintained",
                           headers=auth(token), timeout=5)
    assert missing.status_code == 404 and "nope" in missing.json()["message"]
    assert requests.put(url, timeout=5).status_code == 401
    assert fake.state(rid) == STARTED


def test_injected_5xx_and_429(fake):
    token = acquire(fake).json()["token"]
    fake.configure(fail_next=1)
    assert query(fake, token, "esx").status_code == 503
    assert query(fake, token, "esx").status_code == 200
    fake.configure(throttle_next=1, retry_after=7)
    throttled = query(fake, token, "esx")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    fake.configure(fail_rate=1.0, fail_status=500)
    assert query(fake, token, "esx").status_code == 500
    assert acquire(fake).status_code == 500  # faults hit every suite-api endpoint
    fake.configure(fail_rate=0.5, seed=42)
    first = [query(fake, token, "esx").status_code for _ in range(20)]
    fake.configure(seed=42)
    assert [query(fake, token, "esx").status_code for _ in range(20)] == first
    assert {200, 500} == set(first)
    assert fake.injected["5xx"] >= 3 and fake.injected["429"] == 1


def test_down_mode_and_latency(fake):
    token = acquire(fake).json()["token"]
    fake.configure(down=True)
    with pytest.raises(requests.ConnectionError):
        query(fake, token, "esx")
    fake.configure(down=False, latency=0.2)
    started = time.monotonic()
    assert query(fake, token, "esx").status_code == 200
    assert time.monotonic() - started >= 0.2
    fake.configure(latency=0.3)
    with pytest.raises(requests.Timeout):
        requests.get(f"{fake.url}{QUERY}", headers=auth(token), timeout=0.1)


def test_calls_are_counted_per_endpoint(fake):
    token = acquire(fake).json()["token"]
    rid = fake.resource_id("host-2", VC)
    query(fake, token, "esx")
    query(fake, token, "esx")
    url = f"{fake.url}/suite-api/api/resources/{rid}/maintained"
    requests.put(url, headers=auth(token), timeout=5)
    requests.delete(url, headers=auth(token), timeout=5)
    requests.post(f"{fake.url}/suite-api/api/auth/token/release", headers=auth(token), timeout=5)
    assert fake.calls == {TOKEN_ACQUIRE: 1, RESOURCE_QUERY: 2, MAINTAINED_PUT: 1,
                          MAINTAINED_DELETE: 1, TOKEN_RELEASE: 1}
    assert fake.total_calls() == 6
    fake.reset_calls()
    assert fake.total_calls() == 0 and fake.history == []


def test_admin_endpoints(fake):
    config = requests.post(f"{fake.url}/_fake/config", json={"latency": 0.01, "fail_rate": 0.1},
                           timeout=5)
    assert config.status_code == 200 and config.json()["fail_rate"] == 0.1
    assert requests.post(f"{fake.url}/_fake/config", json={"nope": 1},
                         timeout=5).status_code == 400
    added = requests.post(f"{fake.url}/_fake/hosts",
                          json={"name": "esx9", "moref": "host-9", "vcUuid": VC}, timeout=5)
    rid = added.json()["identifier"]
    state = requests.get(f"{fake.url}/_fake/state", timeout=5).json()
    assert state["resources"][rid] == {"name": "esx9", "moref": "host-9", "vcUuid": VC,
                                       "resourceState": STARTED}
    assert state["calls"] == {}  # admin calls are not counted


def test_parse_host():
    assert parse_host("esx01=host-19@" + VC) == ("esx01", "host-19", VC)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_host("esx01")
