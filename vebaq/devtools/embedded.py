"""An in-process Redis for demos and tests on machines that have none.

fakeredis's TCP server speaks the Redis protocol, and with ``lupa`` installed it runs the Lua
scripts kombu needs, so Celery works against it. It keeps nothing on disk and is slow (tens of
tasks per second, against hundreds on a real Redis): the embedded broker is for trying vebaq
out, never for production.
"""

from __future__ import annotations

import socket
import threading

from fakeredis import TcpFakeServer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class EmbeddedRedis:
    """A fakeredis TCP server on a daemon thread.

    :param port: TCP port on 127.0.0.1; 0 picks a free one.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        # fakeredis ≥ 2.41 keeps serving a connection after an error reply, as Redis does
        # (redis-py's scripts rely on it: EVALSHA → NOSCRIPT → SCRIPT LOAD on one connection).
        self.server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        self.thread = threading.Thread(target=self.server.serve_forever, name="embedded-redis",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    """``python -m vebaq.devtools.embedded [PORT]``: serve until interrupted."""
    import sys

    redis = EmbeddedRedis(int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(redis.url, flush=True)
    try:
        redis.thread.join()
    except KeyboardInterrupt:
        redis.stop()


if __name__ == "__main__":
    main()
