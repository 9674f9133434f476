"""The devstack's Redis, driven with redis-py as the proxy will drive it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


def no_retry() -> Retry:
    """redis-py 8 retries failed commands 3 times with backoff by default, even authentication
    failures (about 4 s): the failures expected here must show at once."""
    return Retry(NoBackoff(), 0)


def client(srv: RedisServer, **kwargs: object) -> redis.Redis:
    return redis.Redis.from_url(srv.url, socket_timeout=5, **kwargs)


def test_password_from_file_and_loopback_only(server: RedisServer) -> None:
    assert server.startup_seconds < 2
    assert server.password_file.read_text().strip() == server.password
    assert server.password_file.stat().st_mode & 0o777 == 0o600
    with client(server) as r:
        assert r.set("greeting", "hello")
        assert r.get("greeting") == b"hello"
    with (
        redis.Redis(host="127.0.0.1", port=server.port, password="wrong", retry=no_retry()) as r,
        pytest.raises(redis.AuthenticationError),
    ):
        r.ping()
    with (
        redis.Redis(host="127.0.0.1", port=server.port, retry=no_retry()) as r,
        pytest.raises(redis.AuthenticationError),
    ):
        r.get("greeting")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", server.port), timeout=2):
        pass  # bound to 127.0.0.1 only
    assert server.cli("GET", "greeting") == "hello"


def test_restart_and_kill_keep_port_and_data(server: RedisServer) -> None:
    with client(server) as r:
        r.set("survivor", "1")
    port = server.port
    server.restart()
    assert server.port == port
    with client(server) as r:
        assert r.get("survivor") == b"1"
        r.set("after-restart", "2")
    server.kill()
    assert server.pids() == []
    with client(server, retry=no_retry()) as r, pytest.raises(redis.ConnectionError):
        r.ping()
    server.start()
    with client(server) as r:  # appendfsync always: a SIGKILL loses nothing that was answered
        assert r.mget("survivor", "after-restart") == [b"1", b"2"]


def test_pause_makes_commands_time_out(server: RedisServer) -> None:
    with client(server) as r:
        r.ping()
        server.pause()
        try:
            with (
                redis.Redis.from_url(server.url, socket_timeout=0.3, retry=no_retry()) as frozen,
                pytest.raises(redis.TimeoutError),
            ):
                frozen.ping()
        finally:
            server.resume()
        assert r.ping()


def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path).start()
    pids = srv.pids()
    assert pids and srv.data_dir.is_dir()
    srv.stop()
    assert srv.pids() == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.port), timeout=1):
        pass
    srv.start()  # same data directory, same port
    assert srv.cli("PING") == "PONG"
    srv.close()


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    with RedisServer(tmp_path, tls_client_auth=True) as srv:
        assert srv.url.startswith("rediss://")
        assert srv.client_cert is not None

        async def roundtrip() -> bytes | None:
            assert srv.client_cert is not None
            r = redis.asyncio.Redis.from_url(
                srv.url,
                ssl_ca_certs=str(srv.ca_cert),
                ssl_certfile=str(srv.client_cert.cert),
                ssl_keyfile=str(srv.client_cert.key),
            )
            try:
                await r.set("tls", "yes")
                value = await r.get("tls")
                assert value is None or isinstance(value, bytes)
                return value
            finally:
                await r.aclose()

        assert asyncio.run(roundtrip()) == b"yes"
        # TLS port only: plaintext is refused, and so is TLS without a client certificate.
        with (
            redis.Redis(
                host="127.0.0.1", port=srv.port, password=srv.password, socket_timeout=2, retry=no_retry()
            ) as plain,
            pytest.raises(redis.ConnectionError),
        ):
            plain.ping()
        with (
            redis.Redis.from_url(srv.url, ssl_ca_certs=str(srv.ca_cert), socket_timeout=2, retry=no_retry()) as no_cert,
            pytest.raises(redis.ConnectionError),
        ):
            no_cert.ping()
        srv.restart()
        assert srv.cli("GET", "tls") == "yes"
