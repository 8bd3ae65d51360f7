"""kombu's Redis transport with an atomic fetch: a message is never out of Redis' keeping.

kombu's Redis channel takes a message in two steps: ``BRPOP`` removes it from the queue's list,
then a second round trip records it as unacked (``ZADD unacked_index`` + ``HSET unacked``), which
is what lets a dead worker's message be restored after the visibility timeout. A worker main
process killed between the two steps — or whose connection drops there — loses that message:
Redis has already handed it out and nothing records it. With ``kill -9`` on busy workers that
happens (1 message in ~1,000 in our reliability tests).

Here the two steps are one: a Lua script pops the message *and* records it as unacked, in the
same format and under the same keys kombu uses, so kombu's own ack, reject, visibility-timeout
restore and shutdown restore work unchanged. A worker that dies at any point after the script
ran leaves the message in ``unacked``, and a live worker restores it once the visibility timeout
has passed. The message is delivered at least once, never zero times.

Scripts cannot block, so waiting for work is a separate command that takes nothing: when every
queue is empty the channel blocks on ``BLMOVE q q RIGHT RIGHT`` — moving a list's last element to
its own end, a no-op that returns as soon as the list is non-empty — and then runs the script
again. A worker consuming one queue (``celery -A workers worker -Q <pool>``: vebaq's pools)
waits on that queue with kombu's usual ``brpop_timeout``; one consuming several waits on the first
for :data:`MULTI_QUEUE_WAIT` at a time (latency up to that much for the others).

Consumers that asked for no acks (``no_ack=True``) keep kombu's plain ``BRPOP``: they accepted
losing a message on death, and recording one they never ack would redeliver it.

Failure modes: if a message is not kombu JSON with a ``delivery_tag`` the script hands it out
unrecorded and kombu fails to decode it, exactly as with ``BRPOP``. Requires Redis ≥ 6.2
(``BLMOVE``); Debian 12's Redis is 7.0. ``global_keyprefix`` is not supported (vebaq never sets
it): the channel refuses it at start rather than consume from the wrong keys.
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError

logger = get_logger(__name__)

#: Longest wait, in seconds, on one queue's list while a channel consuming several queues has
#: no work: a message on another queue waits at most this long before the channel looks again.
MULTI_QUEUE_WAIT = 0.1

#: Pop the first message of KEYS[1..n] (the queue lists, in kombu's priority order) and record
#: it as unacked in KEYS[n+1] (hash: tag → [message, exchange, routing key], kombu's format) and
#: KEYS[n+2] (sorted set: tag → ARGV[1], the time of delivery), atomically. ARGV[2] is n.
#: Returns {list, message} or nil. The message is stored byte for byte as it came: decoding it
#: is only to read its tag and routing (cjson would not give back identical JSON).
CLAIM = """
local n = tonumber(ARGV[2])
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table'
        and message.properties.delivery_tag then
      local props = message.properties
      local info = type(props.delivery_info) == 'table' and props.delivery_info or {}
      local tag = props.delivery_tag
      redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
      redis.call('HSET', KEYS[n + 1], tag, '[' .. item .. ',' .. cjson.encode(info.exchange or '')
                 .. ',' .. cjson.encode(info.routing_key or '') .. ']')
    end
    return {KEYS[i], item}
  end
end
return nil
"""


class AtomicQoS(kombu_redis.QoS):
    """kombu's Redis QoS that does not record again a message the fetch script recorded, and
    survives closing a channel whose connection kombu already dropped."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag == getattr(self.channel, "claimed_tag", None):
            # Already in unacked/unacked_index (one atomic step with the pop): in-memory only.
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        # After a lost connection Celery closes the kombu connection, which may already have
        # detached its transport (transport.client is None): kombu 5.7 then fails with an
        # AttributeError that Celery does not expect and the worker exits. The messages are in
        # Redis' unacked record, so a live worker returns them after the visibility timeout.
        if client is None and getattr(self.channel.connection, "client", None) is None:
            if self._delivered:
                logger.warning("broker connection gone: %d unacked message(s) return to their "
                               "queue after the visibility timeout", len(self._delivered))
            self._delivered.clear()
            return
        super().restore_unacked(client)


class AtomicFetchMixin:
    """The fetch of :mod:`this module <vebaq.core.transport>` for a kombu Redis channel class."""

    QoS = AtomicQoS

    #: Tag of the message being delivered, already recorded as unacked by the fetch script.
    claimed_tag: str | None = None
    #: After an empty fetch the next command waits for work instead of fetching.
    _waiting = False
    #: The command in flight on the polling connection: "CLAIM", "WAIT" or kombu's "BRPOP".
    _sent: str | None = None
    _no_ack_queues: set[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._no_ack_queues = set()
        if self.global_keyprefix:
            raise ValueError("vebaq's Redis transport does not support global_keyprefix")

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # A task that ends after its channel's connection was lost acks or rejects on that
        # channel; kombu 5.7 then fails with an AttributeError (no transport) that no one
        # expects, and the worker exits. A connection error is what kombu and Celery handle:
        # the message stays in Redis' unacked record and returns after the visibility timeout.
        transport = self.connection
        if transport is None or getattr(transport, "client", None) is None:
            raise RedisConnectionError("this channel's broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._no_ack_queues & set(self.active_queues):
            self._sent = "BRPOP"
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        if self._waiting:
            self._sent = "WAIT"
            wait = timeout if len(lists) == 1 else min(timeout or MULTI_QUEUE_WAIT,
                                                        MULTI_QUEUE_WAIT)
            connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", wait or 0)
        else:
            self._sent = "CLAIM"
            connection.send_command("EVAL", CLAIM, len(lists) + 2, *lists, self.unacked_key,
                                    self.unacked_index_key, repr(time()), len(lists))

    def _brpop_read(self, **options: Any) -> bool:
        sent, self._sent = self._sent, None
        if sent == "BRPOP":
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection,
                                                   "BLMOVE" if sent == "WAIT" else "EVAL",
                                                   **options)
            except self.connection_errors:
                # Reconnect on the next round, as kombu does.
                self.client.connection.disconnect()
                raise
            if sent == "WAIT":
                # Work arrived (or the wait timed out): fetch next.
                self._waiting = False
                raise Empty()
            if not reply:
                self._waiting = True
                raise Empty()
            source, item = reply
            queue = bytes_to_str(source).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            message = loads(bytes_to_str(item))
            self.claimed_tag = message.get("properties", {}).get("delivery_tag")
            try:
                self.connection._deliver(message, queue)
            finally:
                self.claimed_tag = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Channel(AtomicFetchMixin, kombu_redis.Channel):
    """kombu's Redis channel with the atomic fetch."""


class SentinelChannel(AtomicFetchMixin, kombu_redis.SentinelChannel):
    """kombu's Redis Sentinel channel with the atomic fetch."""


class Transport(kombu_redis.Transport):
    """``redis://`` with the atomic fetch (Celery: ``broker_transport``, see
    :func:`vebaq.core.broker.celery_config`)."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """``sentinel://`` with the atomic fetch."""

    Channel = SentinelChannel


#: The transport for each broker URL scheme vebaq accepts, as Celery's ``broker_transport``.
TRANSPORTS = {
    "redis": f"{__name__}:Transport",
    "rediss": f"{__name__}:Transport",
    "sentinel": f"{__name__}:SentinelTransport",
}
