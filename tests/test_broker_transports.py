"""kombu keeps vebaq's transport when it switches between the alternatives of a ``;``-separated
broker URL (the Sentinels, after a failover): :func:`vebaq.core.broker.pin_transports`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES, _transport_cache
from kombu.transport import redis as kombu_redis

from vebaq.core import broker, config


class MarkedSentinelTransport(kombu_redis.SentinelTransport):
    """Stands for vebaq's own Sentinel transport."""


MARKED = f"{__name__}:MarkedSentinelTransport"


@pytest.fixture
def kombu_aliases() -> Iterator[None]:
    saved, cached = dict(TRANSPORT_ALIASES), dict(_transport_cache)
    # kombu's own alias, whatever an earlier test's celery_config pinned in this process.
    TRANSPORT_ALIASES["sentinel"] = "kombu.transport.redis:SentinelTransport"
    _transport_cache.pop("sentinel", None)
    yield
    TRANSPORT_ALIASES.clear()
    TRANSPORT_ALIASES.update(saved)
    _transport_cache.clear()
    _transport_cache.update(cached)


def switched(transport: str) -> type:
    """The transport class after kombu moved on to the second Sentinel."""
    connection = Connection("sentinel://127.0.0.1:1;sentinel://127.0.0.1:2", transport=transport,
                            transport_options={"master_name": "m"})
    assert isinstance(connection.transport, MarkedSentinelTransport)
    connection.maybe_switch_next()  # what a failed connection does
    return type(connection.transport)


def test_without_pinning_kombu_falls_back_to_its_own_transport(kombu_aliases: None) -> None:
    assert switched(MARKED) is kombu_redis.SentinelTransport  # the pitfall


def test_pinned_transports_survive_the_switch(kombu_aliases: None) -> None:
    broker.pin_transports({"sentinel": MARKED})
    assert switched(MARKED) is MarkedSentinelTransport


def test_celery_config_pins_the_transports_it_names(kombu_aliases: None) -> None:
    settings = config.load(environ={"VEBAQ_BROKER_URL": "sentinel://h:1;sentinel://h:2",
                                    "VEBAQ_BROKER_MASTER_NAME": "m"})
    conf = broker.celery_config(settings)
    for scheme, target in broker.TRANSPORTS.items():
        assert TRANSPORT_ALIASES[scheme] == target
    assert conf["broker_transport_options"]["master_name"] == "m"
