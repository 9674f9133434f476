"""Test certificates: a fresh CA, server and client certificates that real TLS handshakes accept."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from devstack.certs import TestPKI


def handshake(pki: TestPKI, tmp_path: Path, *, server_host: str, client_cert: bool) -> str:
    """A TLS server on loopback requiring client certificates; returns the client CN it saw."""
    server = pki.server("srv")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    server_ctx.load_cert_chain(server.cert, server.key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client_cert:
        pair = pki.client("alice")
        client_ctx.load_cert_chain(pair.cert, pair.key)
    seen: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    if der is not None:
                        names = x509.load_der_x509_certificate(der).subject
                        seen.extend(str(a.value) for a in names.get_attributes_for_oid(NameOID.COMMON_NAME))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_host) as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(5)
    return seen[0] if seen else ""


def test_mutual_tls_with_ip_and_dns_names(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "pki")
    assert pki.ca_key.stat().st_mode & 0o777 == 0o600
    assert handshake(pki, tmp_path, server_host="127.0.0.1", client_cert=True) == "alice"
    assert handshake(pki, tmp_path, server_host="localhost", client_cert=True) == "alice"


def test_wrong_name_and_missing_client_cert_fail(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "pki")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(pki, tmp_path, server_host="proxy.example.org", client_cert=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(pki, tmp_path, server_host="127.0.0.1", client_cert=False)


def test_another_ca_is_not_trusted(tmp_path: Path) -> None:
    other = TestPKI(tmp_path / "other")
    pki = TestPKI(tmp_path / "pki")
    pair = pki.server("srv")
    context = ssl.create_default_context(cafile=str(other.ca_cert))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pair.chain, pair.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                pytest.raises(ssl.SSLCertVerificationError),
            ):
                context.wrap_socket(raw, server_hostname="127.0.0.1")
        finally:
            thread.join(5)
