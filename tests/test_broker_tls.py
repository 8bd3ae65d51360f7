"""``rediss://``: a real redis-server with TLS on (its own port), a self-signed certificate.

vebaq names its own kombu transport (vebaq.core.transport), which drops kombu's default for
``rediss://`` of *unverified* TLS; vebaq verifies the broker's certificate, for Celery as for its
own Redis clients, against the system's CA store (``SSL_CERT_FILE`` names another bundle).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Consumer, Exchange, Producer, Queue

from tests.support import free_port, wait_until
from vebaq.core import redisdb
from vebaq.core.broker import sender_app
from vebaq.core.config import Settings
from vebaq.core.transport import Channel


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", "",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _pings(url, cert), 20, "redis-server with TLS")
        yield url, cert
    finally:
        server.kill()
        server.wait(10)


def _pings(url: str, cert: Path) -> bool:
    try:
        return bool(redis.Redis.from_url(url, ssl_ca_certs=str(cert)).ping())
    except redis.ConnectionError:
        return False


def test_a_trusted_broker_certificate_carries_tasks(tls_redis: tuple[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = tls_redis
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert redisdb.connect(url).ping()
    app = sender_app(Settings(broker_url=url), "vebaq-test-tls")
    queue = Queue("tls", Exchange("tls", "direct"), routing_key="tls")
    received = []
    with app.connection_for_write() as conn:
        assert isinstance(conn.default_channel, Channel)
        Producer(conn.default_channel).publish({"n": 1}, exchange="tls", routing_key="tls",
                                               declare=[queue])
        with Consumer(conn, [queue], callbacks=[lambda body, m: (received.append(body),
                                                                  m.ack())]):
            conn.drain_events(timeout=10)
    assert received == [{"n": 1}]


def test_an_untrusted_broker_certificate_is_refused(tls_redis: tuple[str, Path]) -> None:
    url, _ = tls_redis
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redisdb.connect(url).ping()
    app = sender_app(Settings(broker_url=url), "vebaq-test-tls")
    with app.connection_for_write() as conn, pytest.raises(Exception,
                                                           match="certificate verify failed"):
        conn.ensure_connection(max_retries=1)
