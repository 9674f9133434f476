"""The devstack's nginx load balancer, round robin over real loopback HTTP servers."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack._proc import free_port
from devstack.nginx import UPSTREAM_HEADER, NginxBalancer

pytestmark = pytest.mark.integration


class Upstream(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 server that answers with its own address and counts the connections it accepted."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.connections = 0
        self.forwarded_for: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[socket.socket, Any]:
        self.connections += 1
        return super().get_request()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:
        self.server.forwarded_for.append(self.headers.get("X-Forwarded-For", ""))
        body = self.server.address.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[Upstream]]:
    servers = [Upstream() for _ in range(3)]
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory, upstreams: list[Upstream]) -> Iterator[NginxBalancer]:
    with NginxBalancer(tmp_path_factory.mktemp("nginx"), [u.address for u in upstreams]) as lb:
        yield lb


def test_round_robin_with_keepalive(balancer: NginxBalancer, upstreams: list[Upstream]) -> None:
    assert balancer.startup_seconds < 2
    before = len(balancer.served_by())
    connections = sum(u.connections for u in upstreams)
    with httpx.Client(base_url=balancer.url) as client:
        answers = [client.get(f"/slurm/v0.0.38/jobs?i={i}") for i in range(12)]
    served = [r.text for r in answers]
    addresses = [u.address for u in upstreams]
    first = addresses.index(served[0])
    assert served == [addresses[(first + i) % 3] for i in range(12)]  # strict rotation
    assert [r.headers[UPSTREAM_HEADER] for r in answers] == served
    assert balancer.served_by()[before:] == served
    # keepalive: 12 requests reuse the upstream connections instead of opening one each
    assert sum(u.connections for u in upstreams) - connections <= 3
    assert all(ff == "127.0.0.1" for u in upstreams for ff in u.forwarded_for)


def test_failed_upstream_is_skipped(balancer: NginxBalancer, upstreams: list[Upstream]) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    balancer.set_upstreams([dead, upstreams[0].address])
    with httpx.Client(base_url=balancer.url) as client:
        answers = [client.get("/") for _ in range(4)]
    assert all(r.status_code == 200 and r.text == upstreams[0].address for r in answers)
    tried = [r.headers[UPSTREAM_HEADER] for r in answers]
    assert f"{dead}, {upstreams[0].address}" in tried  # nginx retried on the next upstream
    balancer.set_upstreams([u.address for u in upstreams])


def test_restart_kill_pause(balancer: NginxBalancer) -> None:
    port = balancer.port
    balancer.restart()
    assert balancer.port == port and httpx.get(balancer.url).status_code == 200
    balancer.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(balancer.url, timeout=0.5)
    finally:
        balancer.resume()
    assert httpx.get(balancer.url).status_code == 200
    balancer.kill()
    assert balancer.pids() == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(balancer.url)
    balancer.start()
    assert httpx.get(balancer.url).status_code == 200
