"""An in-process Redis for demos and tests on machines that have none.

fakeredis's TCP server speaks the Redis protocol, and with ``lupa`` installed it runs the Lua
scripts kombu needs, so Celery works against it. It keeps nothing on disk and is slow (tens of
tasks per second, against hundreds on a real Redis): the embedded broker is for trying vebaq
out, never for production.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from fakeredis import TcpFakeServer
from fakeredis._clients._tcp_server import TCPFakeRequestHandler


class _StayConnected(TCPFakeRequestHandler):
    """fakeredis's handler closes a connection after any error reply; Redis does not, and
    redis-py's scripts rely on that (``EVALSHA`` → ``NOSCRIPT`` → ``SCRIPT LOAD`` on the same
    connection). This handler goes on serving the connection after an error reply."""

    def setup(self) -> None:
        super().setup()
        self.replied_error = False
        dump = self.writer.dump

        def dump_and_note(value: Any) -> None:
            self.replied_error = self.replied_error or isinstance(value, Exception)
            dump(value)

        self.writer.dump = dump_and_note

    def handle(self) -> None:
        while True:
            self.replied_error = False
            super().handle()  # returns on EOF, shutdown, or after replying an error
            if not self.replied_error or self.server._shutdown_event.is_set():
                return


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
        self.server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        self.server.RequestHandlerClass = _StayConnected
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
    """``python -m vebaq.embedded [PORT]``: serve until interrupted (tests use it as a process)."""
    import sys

    redis = EmbeddedRedis(int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(redis.url, flush=True)
    try:
        redis.thread.join()
    except KeyboardInterrupt:
        redis.stop()


if __name__ == "__main__":
    main()
