"""The embedded broker behaves like Redis where vebaq and redis-py rely on it."""

from __future__ import annotations

import contextlib

import redis

from vebaq.devtools.embedded import EmbeddedRedis


def test_scripts_and_error_replies_keep_the_connection() -> None:
    server = EmbeddedRedis().start()
    try:
        client = redis.Redis.from_url(server.url, single_connection_client=True)
        script = client.register_script("return ARGV[1]")
        assert script(args=["first"]) == b"first"  # EVALSHA → NOSCRIPT → SCRIPT LOAD → EVALSHA
        client.set("text", "not a number")
        with contextlib.suppress(redis.ResponseError):
            client.incr("text")
        assert client.ping()  # still connected after an error reply
        assert client.eval("return redis.call('GET', KEYS[1])", 1, "text") == b"not a number"
    finally:
        server.stop()
