"""vebaq's Redis transport (vebaq.core.transport) against a real redis-server.

A process killed with ``kill -9`` does one thing to Redis: its socket closes. So "a worker died
right after Redis handed it a message" is modelled exactly by sending the fetch command on a
consumer's connection and closing that connection without reading the reply: Redis has run the
command either way. With kombu's stock transport the message is then gone; with vebaq's it is
recorded as unacked and a live consumer restores it after the visibility timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from vebaq.core.broker import celery_config
from vebaq.core.config import Settings
from vebaq.core.redisdb import CONNECT_TIMEOUT
from vebaq.core.transport import Channel, SentinelTransport, Transport
from workers.app import create_app

VISIBILITY = 1  # seconds: kept short so that the restore happens within the test


@contextmanager
def connection(url: str, transport: type = Transport) -> Iterator[Connection]:
    with Connection(url, transport=transport,
                    transport_options={"visibility_timeout": VISIBILITY,
                                       "priority_steps": [0]}) as conn:
        yield conn


def kombu_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def publish(url: str, queue: str, *bodies: dict) -> None:
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(body, exchange=queue, routing_key=queue, serializer="json",
                             declare=[kombu_queue(queue)])


def consume(url: str, queues: list[str], count: int, timeout: float = 10) -> list[dict]:
    """Consume ``count`` messages (acking each) from ``queues`` with vebaq's transport."""
    received: list[dict] = []
    with connection(url) as conn:
        def on_message(body: dict, message) -> None:
            received.append(body)
            message.ack()
        with conn.Consumer([kombu_queue(q) for q in queues], callbacks=[on_message]):
            deadline = time.monotonic() + timeout
            while len(received) < count and time.monotonic() < deadline:
                with suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
    return received


def die_after_fetch(url: str, queue: str, transport: type) -> None:
    """Start a fetch on a consumer's connection, then drop the connection unread (kill -9)."""
    with connection(url, transport) as conn:
        channel = conn.default_channel
        channel.basic_consume(queue, no_ack=False, callback=lambda message: None,
                              consumer_tag="doomed")
        conn.transport.cycle.on_poll_start()  # connects and sends the fetch, as drain_events
        assert channel._in_poll, "a fetch is in flight"
        time.sleep(0.2)  # Redis runs the command
        channel.client.connection.disconnect()
        channel._in_poll = None


def test_a_consumer_dying_after_the_fetch_loses_nothing(redis_url: str,
                                                        redis_client: redis.Redis) -> None:
    publish(redis_url, "atomic", {"n": 1})
    die_after_fetch(redis_url, "atomic", Transport)
    assert redis_client.llen("atomic") == 0
    assert redis_client.hlen("unacked") == 1, "the fetched message is recorded as unacked"
    time.sleep(VISIBILITY + 0.1)
    assert consume(redis_url, ["atomic"], 1) == [{"n": 1}], "restored and delivered"
    assert redis_client.hlen("unacked") == 0


def test_kombus_stock_fetch_loses_that_message(redis_url: str, redis_client: redis.Redis) -> None:
    """Why the module exists: the same death with kombu's BRPOP transport."""
    publish(redis_url, "stock", {"n": 1})
    die_after_fetch(redis_url, "stock", kombu_redis.Transport)
    time.sleep(VISIBILITY + 0.1)
    assert redis_client.llen("stock") == 0
    assert redis_client.hlen("unacked") == 0
    assert consume(redis_url, ["stock"], 1, timeout=2) == []


def test_the_unacked_record_is_the_one_kombu_writes(redis_url: str,
                                                    redis_client: redis.Redis) -> None:
    """kombu restores from this record, so it must be kombu's format, message byte for byte."""
    publish(redis_url, "format", {"text": "a/b \u00e9 \"quoted\"", "empty": [], "none": None})
    raw = redis_client.lindex("format", 0)
    die_after_fetch(redis_url, "format", Transport)
    (tag, record), = redis_client.hgetall("unacked").items()
    message, exchange, routing_key = json.loads(record)
    assert message == json.loads(raw)
    assert record.startswith(b"[" + raw + b",")
    assert (exchange, routing_key) == ("format", "format")
    assert tag.decode() == message["properties"]["delivery_tag"]
    assert redis_client.zscore("unacked_index", tag) <= time.time()


def test_an_acked_message_leaves_no_record(redis_url: str, redis_client: redis.Redis) -> None:
    publish(redis_url, "acked", *({"n": n} for n in range(20)))
    assert sorted(b["n"] for b in consume(redis_url, ["acked"], 20)) == list(range(20))
    assert redis_client.hlen("unacked") == redis_client.zcard("unacked_index") == 0


def test_a_consumer_of_several_queues_gets_them_all(redis_url: str) -> None:
    publish(redis_url, "first", *({"q": 1, "n": n} for n in range(5)))
    publish(redis_url, "second", *({"q": 2, "n": n} for n in range(5)))
    received = consume(redis_url, ["first", "second"], 10)
    assert sorted((b["q"], b["n"]) for b in received) == [(q, n) for q in (1, 2) for n in range(5)]


def test_an_idle_consumer_wakes_for_a_new_message(redis_url: str) -> None:
    """Waiting (BLMOVE q q) takes nothing; the message published during the wait is fetched."""
    import threading

    threading.Timer(1.0, publish, (redis_url, "late", {"n": 1})).start()
    assert consume(redis_url, ["late"], 1) == [{"n": 1}]


def test_no_ack_consumers_keep_kombus_fetch(redis_url: str, redis_client: redis.Redis) -> None:
    publish(redis_url, "noack", {"n": 1})
    received = []
    with connection(redis_url) as conn, conn.Consumer([kombu_queue("noack")], no_ack=True,
                       callbacks=[lambda body, message: received.append(body)]):
        conn.drain_events(timeout=5)
    assert received == [{"n": 1}]
    assert redis_client.hlen("unacked") == 0, "nothing recorded that no one would ack"


def test_every_vebaq_process_uses_it(redis_url: str) -> None:
    app = create_app(broker_url=redis_url)
    with app.connection_for_write() as conn:
        assert isinstance(conn.default_channel, Channel)
        # A broker host that stops answering cannot hang a connect() forever.
        assert conn.default_channel.socket_connect_timeout == CONNECT_TIMEOUT
    sentinel = celery_config(Settings(broker_url="sentinel://127.0.0.1:26379"))
    assert sentinel["broker_transport"].endswith(":SentinelTransport")
    assert SentinelTransport.Channel.__mro__[1].__name__ == "AtomicFetchMixin"
