"""HTTPS on the real proxy server (``slurmproxy serve`` with ``server.tls``) in front of real Slurm and the
real provider: a job through a client certificate and a token, refusals without the certificate, the
slow-client defences over TLS, and a renewed certificate picked up while a connection stays open."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from devstack import SlurmCluster
from devstack.certs import TestPKI
from devstack.provider import PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import job_body, proxy_config, records_for, site_policy

BOUND = 60.0  # seconds: far above the deadlines configured here (1 s headers, 0.5 s reload checks)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_proxy(
    slurm: SlurmCluster, oidc: OidcProvider, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    workdir = tmp_path_factory.mktemp("tls-proxy")
    server_pair = pki.server("proxy")
    shutil.copyfile(server_pair.cert, workdir / "tls.crt")
    shutil.copyfile(server_pair.key, workdir / "tls.key")
    pki.client("interlink-edge")  # what edge_context() presents
    tls = {
        "cert_file": str(workdir / "tls.crt"),
        "key_file": str(workdir / "tls.key"),
        "client_ca_file": str(pki.ca_cert),
        "reload_interval_seconds": 0.5,
    }
    server = {"tls": tls, "header_timeout_seconds": 1, "keep_alive_seconds": 60}
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    config = proxy_config(slurm, [issuer], server=server)
    proxy = ProxyServer(workdir, config, {"site.yaml": site_policy(oidc.issuer)}, client_ssl=edge_context(pki))
    with proxy:
        yield proxy


def edge_context(pki: TestPKI, with_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_certificate:
        edge = pki.directory / "client-interlink-edge.pem"
        context.load_cert_chain(edge, edge.with_name("client-interlink-edge-key.pem"))
    return context


def test_a_job_over_https_with_a_client_certificate_and_a_token(
    tls_proxy: ProxyServer, oidc: OidcProvider, pki: TestPKI, slurm: SlurmCluster, api: str, request_id: str
) -> None:
    assert tls_proxy.url.startswith("https://")
    token = oidc.client_credentials_token("alice-cli")
    directory = slurm.job_dir("alice")
    with httpx.Client(base_url=tls_proxy.url, verify=edge_context(pki), timeout=60) as client:
        response = client.post(
            f"{api}/job/submit",
            json=job_body(api, directory),
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
        )
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert slurm.wait_job(job_id)["UserId"] == "alice(2001)"
    (record,) = records_for(tls_proxy, request_id)
    assert record["decision"] == "allow" and record["job_id"] == job_id


def test_without_the_client_certificate_nothing_is_answered(
    tls_proxy: ProxyServer, oidc: OidcProvider, pki: TestPKI, api: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(
            f"{tls_proxy.url}{api}/ping",
            headers={"Authorization": f"Bearer {token}"},
            verify=edge_context(pki, with_certificate=False),
            timeout=30,
        )
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
        httpx.get(f"http://127.0.0.1:{tls_proxy.port}{api}/ping", timeout=30)  # plain HTTP to the TLS port


def test_slow_headers_over_tls_get_408_while_others_are_served(
    tls_proxy: ProxyServer, oidc: OidcProvider, pki: TestPKI, api: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    slow = []
    for n in range(20):
        raw = socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=BOUND)
        sock = edge_context(pki).wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(f"GET {api}/ping HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: tls-loris-{n}\r\nX-Slow: ".encode())
        slow.append(sock)
    with httpx.Client(base_url=tls_proxy.url, verify=edge_context(pki), timeout=60) as client:
        assert client.get(f"{api}/ping", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    answers = []
    for sock in slow:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        answers.append(data)
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    reasons = {r["reason"] for r in tls_proxy.audit_records() if r["request_id"].startswith("tls-loris-")}
    assert reasons == {"header_timeout"}


def test_a_renewed_certificate_is_served_and_open_connections_stay(
    tls_proxy: ProxyServer, pki: TestPKI, api: str
) -> None:
    before = (tls_proxy.workdir / "tls.crt").read_text()
    with httpx.Client(base_url=tls_proxy.url, verify=edge_context(pki), timeout=60) as kept:
        assert kept.get("/_slurmproxy/live").status_code == 200
        renewed = pki.server("proxy-renewed")
        for source, name in ((renewed.key, "tls.key"), (renewed.cert, "tls.crt")):
            shutil.copyfile(source, tls_proxy.workdir / f"{name}.new")
            (tls_proxy.workdir / f"{name}.new").replace(tls_proxy.workdir / name)
        expected = ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())
        deadline = time.monotonic() + BOUND
        while served_certificate(tls_proxy, pki) != expected:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.1)
        assert kept.get("/_slurmproxy/live").status_code == 200  # the same connection, still open
    assert before != (tls_proxy.workdir / "tls.crt").read_text()


def served_certificate(proxy: ProxyServer, pki: TestPKI) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=BOUND) as raw,
        edge_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return der
