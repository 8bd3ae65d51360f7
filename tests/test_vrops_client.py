"""VropsClient against the fake vROps over real HTTP: token reuse, host matching, errors."""

from __future__ import annotations

import logging
import time

import pytest

from vebaq.core.config import VropsSettings
from vebaq.core.secrets import Secret
from vebaq.devtools.fake_vrops import (
    MAINTAINED,
    MAINTAINED_DELETE,
    MAINTAINED_PUT,
    RESOURCE_QUERY,
    STARTED,
    TOKEN_ACQUIRE,
    FakeVrops,
)
from workers.errors import PermanentError
from workers.vrops_client import (
    VropsClient,
    VropsRejected,
    VropsUnavailable,
    choose_host,
    parse_retry_after,
)

VC_A = "11111111-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
VC_B = "22222222-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
PASSWORD = "Pa55-w0rd!vrops"


@pytest.fixture
def fake():
    hosts = [("esx01", "host-19", VC_A), ("esx01", "host-19", VC_B),  # same name, same moref
             ("esx1", "host-1", VC_A), ("esx10", "host-10", VC_A)]
    with FakeVrops(hosts, username="admin", password=PASSWORD) as server:
        yield server


def settings(fake: FakeVrops, **overrides) -> VropsSettings:
    values = {"url": fake.url, "username": "admin", "password": Secret(PASSWORD), "timeout": 2.0}
    values.update(overrides)
    return VropsSettings(**values)


@pytest.fixture
def client(fake):
    vrops = VropsClient(settings(fake))
    yield vrops
    vrops.close()


def test_steady_state_is_one_call_per_event(fake, client):
    client.mark_host("esx01", "host-19", VC_A, True)
    assert fake.calls == {TOKEN_ACQUIRE: 1, RESOURCE_QUERY: 1, MAINTAINED_PUT: 1}
    fake.reset_calls()
    for i in range(10):
        client.mark_host("esx01", "host-19", VC_A, i % 2 == 1)
    assert fake.total_calls() == 10  # token and resource id both cached
    assert fake.host_state("host-19", VC_A) == MAINTAINED
    assert fake.host_state("host-19", VC_B) == STARTED


def test_token_is_renewed_before_its_validity_ends():
    with FakeVrops([("esx01", "host-19", VC_A)], password=PASSWORD, token_ttl=0.5) as fake:
        vrops = VropsClient(settings(fake))
        vrops.mark_host("esx01", "host-19", VC_A, True)
        time.sleep(0.5)
        vrops.mark_host("esx01", "host-19", VC_A, False)
        assert fake.calls[TOKEN_ACQUIRE] == 2
        assert sum(fake.calls.values()) == 5  # no 401 round trip: validity was used


def test_401_reacquires_the_token_once(fake, client):
    rid = client.resource_for_host("esx01", "host-19", VC_A)
    fake.expire_tokens()  # vROps forgot the token (restart, expiry, release elsewhere)
    fake.reset_calls()
    client.set_maintained(rid, True)
    assert fake.calls == {MAINTAINED_PUT: 2, TOKEN_ACQUIRE: 1}
    assert fake.state(rid) == MAINTAINED
    fake.expire_tokens()
    fake.configure(token_ttl=0)  # every new token is dead on arrival
    fake.reset_calls()
    with pytest.raises(VropsRejected) as failure:
        client.set_maintained(rid, False)
    assert failure.value.status == 401
    assert fake.calls == {MAINTAINED_DELETE: 2, TOKEN_ACQUIRE: 1}


def test_bad_credentials_are_rejected_without_showing_the_password(fake):
    vrops = VropsClient(settings(fake, password=Secret("wrong-password-123")))
    with pytest.raises(VropsRejected) as failure:
        vrops.resource_for_host("esx01", "host-19", VC_A)
    assert failure.value.status == 401
    assert "VROPS_PASSWORD" in str(failure.value)
    assert "wrong-password-123" not in str(failure.value)
    assert isinstance(failure.value, PermanentError)


def test_identifiers_pick_the_host_of_the_right_vcenter(fake, client):
    a = client.resource_for_host("esx01", "host-19", VC_A)
    b = client.resource_for_host("esx01", "host-19", VC_B.upper())  # UUID case does not matter
    assert (a, b) == (fake.resource_id("host-19", VC_A), fake.resource_id("host-19", VC_B))
    # "esx1" also finds "esx10": the name search is not exact.
    assert client.resource_for_host("esx1", "host-1", VC_A) == fake.resource_id("host-1", VC_A)
    fake.reset_calls()
    client.resource_for_host("esx01", "host-19", VC_B)
    assert fake.total_calls() == 0  # cached per (vCenter, moref)


def test_unknown_host_is_a_permanent_error_with_the_reason(fake, client):
    with pytest.raises(VropsRejected) as failure:
        client.resource_for_host("esx01", "host-99", VC_A)
    message = str(failure.value)
    assert "host-99" in message and "VMEntityObjectID" in message
    assert "2 named so belong to other hosts or vCenters" in message
    with pytest.raises(PermanentError):
        client.resource_for_host("esx77", "host-77", VC_A)


def resource(identifier: str, name: str, moref: str | None, vc: str | None) -> dict:
    ids = [{"identifierType": {"name": "VMEntityName"}, "value": name}]
    if moref is not None:
        ids.append({"identifierType": {"name": "VMEntityObjectID"}, "value": moref})
    if vc is not None:
        ids.append({"identifierType": {"name": "VMEntityVCID"}, "value": vc})
    return {"identifier": identifier, "resourceKey": {"name": name, "resourceIdentifiers": ids}}


def test_choose_host_rules():
    both = [resource("a", "esx01", "host-19", VC_A), resource("b", "esx01", "host-19", VC_B)]
    assert choose_host(both, "esx01", "host-19", VC_B) == ("b", "identifiers")
    twice = [resource("a", "esx01", "host-19", VC_A), resource("a2", "esx01.lab", "host-19", VC_A)]
    identifier, why = choose_host(twice, "esx01", "host-19", VC_A)
    assert identifier is None and "2 resources" in why
    # Fallback: a unique exact name whose identifiers do not contradict the event's.
    bare = [resource("x", "esx01", None, None), resource("y", "esx010", None, None)]
    assert choose_host(bare, "esx01", "host-19", VC_A) == ("x", "exact name")
    ambiguous = [resource("x", "esx01", None, None), resource("z", "esx01", None, None)]
    identifier, why = choose_host(ambiguous, "esx01", "host-19", VC_A)
    assert identifier is None and "ambiguous" in why
    # Never the first hit, and never a same-named host of another vCenter.
    other = [resource("b", "esx01", "host-19", VC_B)]
    assert choose_host(other, "esx01", "host-19", VC_A)[0] is None
    assert choose_host([], "esx01", "host-19", VC_A)[0] is None


def test_5xx_429_and_timeouts_are_retryable(fake, client):
    rid = client.resource_for_host("esx01", "host-19", VC_A)
    fake.configure(fail_next=1)
    with pytest.raises(VropsUnavailable) as failure:
        client.set_maintained(rid, True)
    assert failure.value.status == 503 and failure.value.retry_after is None
    assert not isinstance(failure.value, PermanentError)
    fake.configure(throttle_next=1, retry_after=7)
    with pytest.raises(VropsUnavailable) as failure:
        client.set_maintained(rid, True)
    assert failure.value.status == 429 and failure.value.retry_after == 7
    fake.configure(latency=0.5)
    quick = VropsClient(settings(fake, timeout=0.1))
    with pytest.raises(VropsUnavailable) as failure:
        quick.resource_for_host("esx01", "host-19", VC_A)
    assert failure.value.status is None and "0.1s" in str(failure.value)
    assert set(failure.value.knative_error_attributes()) == {"knativeerrordest"}
    fake.configure(latency=0, down=True)
    with pytest.raises(VropsUnavailable):
        client.set_maintained(rid, True)
    fake.configure(down=False)
    client.set_maintained(rid, True)
    assert fake.state(rid) == MAINTAINED


def test_retry_after_forms():
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_404_is_rejected_with_knative_attributes(fake, client):
    with pytest.raises(VropsRejected) as failure:
        client.set_maintained("no-such-resource", True)
    error = failure.value
    assert error.status == 404 and isinstance(error, PermanentError)
    attributes = error.knative_error_attributes()
    assert attributes["knativeerrordest"] == \
        f"{fake.url}/suite-api/api/resources/no-such-resource/maintained"
    assert attributes["knativeerrorcode"] == "404"
    assert "no-such-resource" in attributes["knativeerrordata"]
    assert len(attributes["knativeerrordata"]) <= 200


def test_a_cached_resource_id_that_vanished_is_looked_up_again(fake, client):
    client._resources[(VC_A, "host-19")] = "stale-id"
    assert client.mark_host("esx01", "host-19", VC_A, True) == fake.resource_id("host-19", VC_A)
    assert fake.host_state("host-19", VC_A) == MAINTAINED


def test_url_forms_and_tls_settings(fake):
    for url in (fake.url + "/", fake.url + "/suite-api", fake.url + "/suite-api/api"):
        assert VropsClient(settings(fake, url=url)).base_url == fake.url
    assert VropsClient(settings(fake)).session.verify is True
    assert VropsClient(settings(fake, insecure_ssl=True)).session.verify is False
    assert VropsClient(settings(fake, ca_bundle="/etc/ca.pem")).session.verify == "/etc/ca.pem"
    with pytest.raises(PermanentError, match="VROPS_URL"):
        VropsClient(VropsSettings())


def test_password_and_token_never_logged_or_shown(fake, client, caplog):
    caplog.set_level(logging.DEBUG)
    rid = client.resource_for_host("esx01", "host-19", VC_A)
    token = client._token.value
    errors = []
    fake.configure(fail_next=1)
    fake.expire_tokens()
    for action in (lambda: client.set_maintained(rid, True),       # 401 then 503
                   lambda: client.set_maintained("nope", True),      # 401 then 404
                   lambda: client.resource_for_host("esx01", "host-5", VC_A)):
        try:
            action()
        except (VropsUnavailable, VropsRejected) as exc:
            errors.append(exc)
    fake.configure(token_ttl=0)
    fake.expire_tokens()
    try:
        client.set_maintained(rid, True)
    except VropsRejected as exc:
        errors.append(exc)
    assert len(errors) == 4
    token2 = client._token.value
    shown = [caplog.text, repr(client), repr(client.settings), repr(client._token)]
    shown += [str(e) for e in errors] + [repr(e) for e in errors]
    shown += [str(e.knative_error_attributes()) for e in errors]
    for text in shown:
        for secret in (PASSWORD, token, token2):
            assert secret not in text
    assert "token acquired" in caplog.text
