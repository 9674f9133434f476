"""Slow and abusive clients against the real server: slow-loris connections are cut at the header
deadline without starving anyone, and a slow body is cut at the body deadline."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, job_body, proxy_config, records_for, site_policy
from tests.integration.hostile import RestdLog, http_bytes

SLOW_CONNECTIONS = 200
HEADER_TIMEOUT = 3
BODY_TIMEOUT = 3
BOUND = 90  # seconds: far above the deadlines, so only a hung connection can fail it


@pytest.fixture(scope="module")
def guarded(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    server = {"header_timeout_seconds": HEADER_TIMEOUT, "body_timeout_seconds": BODY_TIMEOUT}
    return proxy_factory(proxy_config(slurm, [issuer], server=server), {"site.yaml": site_policy(oidc.issuer)})


def _drip(sockets: dict[socket.socket, bytes]) -> None:
    """One more header byte on every open slow connection; collect what the server sent back."""
    for sock in list(sockets):
        with contextlib.suppress(OSError):
            sock.send(b"X")
    readable, _, _ = select.select(list(sockets), [], [], 0)
    for sock in readable:
        try:
            sockets[sock] += sock.recv(65536) or b"<eof>"
        except OSError:
            sockets[sock] += b"<reset>"


def test_slow_loris_connections_time_out_while_normal_requests_succeed(
    guarded: ProxyServer, oidc: OidcProvider, api: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    started = time.monotonic()
    slow: dict[socket.socket, bytes] = {}
    for n in range(SLOW_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
        sock.sendall(f"GET {api}/ping HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: loris-{n}\r\nX-Slow: ".encode())
        sock.setblocking(False)
        slow[sock] = b""
    statuses: list[int] = []
    try:
        with httpx.Client(base_url=guarded.url, timeout=30) as client:
            while any(not data.endswith((b"<eof>", b"<reset>")) for data in slow.values()):
                assert time.monotonic() - started < BOUND, "slow connections were not closed"
                _drip(slow)
                response = client.get(f"{api}/ping", headers={"Authorization": f"Bearer {token}"})
                statuses.append(response.status_code)
                time.sleep(0.2)
    finally:
        for sock in slow:
            sock.close()
    assert len(statuses) >= 5 and set(statuses) == {200}, statuses
    answers = list(slow.values())
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    refused = [json.loads(a.split(b"\r\n\r\n", 1)[1].split(b"<eof>")[0]) for a in answers[:3]]
    assert {r["slurmproxy"]["reason"] for r in refused} == {"header_timeout"}
    records = [r for r in guarded.audit_records() if r["reason"] == "header_timeout"]
    assert len(records) >= SLOW_CONNECTIONS
    assert {r["status"] for r in records} == {408} and {r["client"] for r in records} == {"127.0.0.1"}


@pytest.mark.parametrize("drip", [False, True], ids=["stalled-body", "dripped-body"])
def test_a_slow_body_is_cut_at_the_body_deadline(
    guarded: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str, drip: bool
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    body = json.dumps(job_body(api, slurm.job_dir("alice"))).encode()
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("X-Request-ID", request_id),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body) + 1000)),
    ]
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=BOUND) as sock:
        sock.sendall(http_bytes("POST", f"{api}/job/submit", headers) + body[:50])
        sock.settimeout(0.3 if drip else BOUND)
        while not received.endswith(b"}") and time.monotonic() - started < BOUND:
            if drip:
                sock.sendall(b" ")
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["slurmproxy"]["reason"] == "body_timeout"
    (record,) = records_for(guarded, request_id)
    assert record["status"] == 408 and record["reason"] == "body_timeout" and record["subject"] == "alice"
    assert {j["JobId"] for j in slurm.jobs()} == jobs_before
    assert restd.since(mark) == []  # job bodies are read (and checked) whole before anything is forwarded
