"""HTTPS on the proxy: a real uvicorn server in-process with certificates made at test time, talked to by
Python's own TLS client. Versions and ciphers, client certificates, the reload of a renewed certificate
without dropping open connections, the slow-client defences over TLS, and where plain HTTP is allowed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pytest_httpx import HTTPXMock

from devstack._proc import free_port
from devstack.certs import CertPair, TestPKI
from slurmproxy.commands.serve import uvicorn_options
from slurmproxy.config.settings import ServerSettings, TlsSettings, is_loopback
from slurmproxy.errors import ConfigError
from slurmproxy.pipeline.app import create_app
from slurmproxy.web.tls import ContextFactory, ServerTLS, _new_loop, build_context
from tests.helpers import ISSUER, JWKS_URI, Signer, discovery, make_settings
from tests.web.test_protocol import answer

pytestmark = pytest.mark.anyio
GET_LIVE = b"GET /_slurmproxy/live HTTP/1.1\r\nHost: proxy\r\n\r\n"
BOUND = 30.0  # seconds: far above every deadline below, so only a hang fails a test


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return TestPKI(tmp_path / "pki")


def install(pair: CertPair, directory: Path) -> tuple[Path, Path]:
    """Copy a pair to fixed names, as a site's renewal job does (write, then rename over)."""
    directory.mkdir(exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    for source, target in ((pair.cert, cert), (pair.key, key)):
        shutil.copyfile(source, target.with_suffix(".new"))
        target.with_suffix(".new").replace(target)
    return cert, key


@asynccontextmanager
async def served_tls(
    tmp_path: Path, httpx_mock: HTTPXMock, tls: dict[str, Any], **server: Any
) -> AsyncIterator[tuple[int, ContextFactory]]:
    signer = Signer()
    httpx_mock.add_response(
        url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True, is_optional=True
    )
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True, is_optional=True)
    settings = make_settings(tmp_path, server={"header_timeout_seconds": 1.0, "tls": tls, **server})
    port = free_port()
    options = uvicorn_options(settings)
    factory = options["ssl_context_factory"]
    options.update(log_config=None, timeout_graceful_shutdown=5)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, lifespan="on", **options)
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve())
    while not instance.started:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    try:
        yield port, factory
    finally:
        instance.should_exit = True
        await asyncio.wait_for(task, 30)
        assert factory.server is not None
        factory.server.close()


def client_context(pki: TestPKI, pair: CertPair | None = None, **options: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    for name, value in options.items():
        if name == "ciphers":
            context.set_ciphers(value)
        else:
            setattr(context, name, value)
    return context


async def https(port: int, context: ssl.SSLContext, data: bytes = GET_LIVE) -> tuple[bytes, bytes, str]:
    """One request over TLS; the answer until the server closes, the server's certificate, the version."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context), BOUND)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True)
        writer.write(data.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        return await asyncio.wait_for(reader.read(), BOUND), peer, ssl_object.version()
    finally:
        writer.close()


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


async def test_https_with_tls12_and_13_and_only_forward_secret_aead_ciphers(
    tmp_path: Path, httpx_mock: HTTPXMock, pki: TestPKI
) -> None:
    cert, key = install(pki.server("proxy"), tmp_path / "tls")
    async with served_tls(tmp_path, httpx_mock, {"cert_file": str(cert), "key_file": str(key)}) as (port, _):
        raw, peer, version = await https(port, client_context(pki))
        assert answer(raw)[0] == 200 and peer == der(cert) and version == "TLSv1.3"
        tls12 = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        raw, _, version = await https(port, tls12)
        assert answer(raw)[0] == 200 and version == "TLSv1.2"
        # A CBC suite (which OpenSSL's defaults would accept), offered alone: the handshake fails.
        cbc = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await https(port, cbc)
        # Plain HTTP to the TLS port gets no answer from the application.
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", port)
        plain_writer.write(GET_LIVE)
        assert b"200 OK" not in await asyncio.wait_for(plain_reader.read(), BOUND)
        plain_writer.close()


async def test_min_version_tls13(tmp_path: Path, httpx_mock: HTTPXMock, pki: TestPKI) -> None:
    cert, key = install(pki.server("proxy"), tmp_path / "tls")
    tls = {"cert_file": str(cert), "key_file": str(key), "min_version": "TLSv1.3"}
    async with served_tls(tmp_path, httpx_mock, tls) as (port, _):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await https(port, client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
        assert answer((await https(port, client_context(pki)))[0])[0] == 200


async def test_a_renewed_certificate_is_served_without_dropping_open_connections(
    tmp_path: Path, httpx_mock: HTTPXMock, pki: TestPKI
) -> None:
    cert, key = install(pki.server("first"), tmp_path / "tls")
    tls = {"cert_file": str(cert), "key_file": str(key), "reload_interval_seconds": 0.1}
    async with served_tls(tmp_path, httpx_mock, tls, keep_alive_seconds=60) as (port, factory):
        first = der(cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki))
        writer.write(GET_LIVE)
        assert (await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), BOUND)).startswith(b"HTTP/1.1 200")
        assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == first

        # A key that does not match the certificate (a renewal caught half-way): the old pair stays.
        shutil.copyfile(pki.server("stray").key, key)
        assert factory.server is not None
        deadline = time.monotonic() + BOUND
        while factory.server.failures == 0:
            assert time.monotonic() < deadline, "the mismatched key was never noticed"
            await asyncio.sleep(0.05)
        assert (await https(port, client_context(pki)))[1] == first

        install(pki.server("second"), tmp_path / "tls")
        second = der(cert)
        while (await https(port, client_context(pki)))[1] != second:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            await asyncio.sleep(0.05)
        # The connection opened before the renewal still works, with the certificate it was opened with.
        writer.write(GET_LIVE)
        assert (await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), BOUND)).startswith(b"HTTP/1.1 200")
        assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == first
        writer.close()
        assert factory.server.reloads == 1


async def test_client_certificates_from_the_configured_ca_only(
    tmp_path: Path, httpx_mock: HTTPXMock, pki: TestPKI
) -> None:
    cert, key = install(pki.server("proxy"), tmp_path / "tls")
    stranger = TestPKI(tmp_path / "other", name="someone else's CA").client("interlink-edge")
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki.ca_cert)}
    async with served_tls(tmp_path, httpx_mock, tls) as (port, _):
        raw, _, _ = await https(port, client_context(pki, pki.client("interlink-edge")))
        assert answer(raw)[0] == 200
        for label, pair in (("no certificate", None), ("another CA", stranger)):
            # TLS 1.3: the server refuses the client's certificate after the client thinks it is done, so
            # the refusal shows as an alert on the first read (or as a closed connection), never an answer.
            try:
                raw, _, _ = await https(port, client_context(pki, pair))
            except (ssl.SSLError, ConnectionError):
                continue
            assert raw == b"", label
        for version in (ssl.TLSVersion.TLSv1_2,):  # with 1.2 the handshake itself fails
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await https(port, client_context(pki, stranger, maximum_version=version))


async def test_slow_clients_over_tls_get_the_header_deadline(
    tmp_path: Path, httpx_mock: HTTPXMock, pki: TestPKI
) -> None:
    cert, key = install(pki.server("proxy"), tmp_path / "tls")
    async with served_tls(tmp_path, httpx_mock, {"cert_file": str(cert), "key_file": str(key)}) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki))
        writer.write(b"GET /_slurmproxy/live HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")
        started = time.monotonic()
        raw = await asyncio.wait_for(reader.read(), BOUND)
        writer.close()
        assert answer(raw)[0] == 408 and answer(raw)[2]["slurmproxy"]["reason"] == "header_timeout"
        assert time.monotonic() - started < BOUND
        # Too large headers over TLS too.
        raw, _, _ = await https(port, client_context(pki), b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
        assert answer(raw)[0] == 431


def test_a_stalled_tls_handshake_is_cut_at_the_deadline(pki: TestPKI) -> None:
    """The event loop uvicorn gets (server.tls set) bounds handshakes; asyncio's own default is 60 s."""
    pair = pki.server("proxy")
    context = build_context(TlsSettings(cert_file=pair.cert, key_file=pair.key))
    loop = _new_loop(0.5)

    async def stalled() -> tuple[bytes, float]:
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # TCP only: no ClientHello
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), BOUND)
        writer.close()
        server.close()
        return data, time.monotonic() - started

    try:
        data, elapsed = loop.run_until_complete(stalled())
    finally:
        loop.close()
    assert data == b"" and elapsed < 30  # closed by the proxy's deadline, long before asyncio's 60 s


def test_files_that_do_not_load_are_config_errors_naming_the_file(tmp_path: Path, pki: TestPKI) -> None:
    pair = pki.server("proxy")
    with pytest.raises(ConfigError, match="no such file"):
        build_context(TlsSettings(cert_file=tmp_path / "missing.pem", key_file=pair.key))
    with pytest.raises(ConfigError, match="not a PEM certificate") as caught:
        build_context(TlsSettings(cert_file=pair.cert, key_file=pki.server("other").key))
    assert "PRIVATE KEY" not in caught.value.detail
    junk = tmp_path / "junk.pem"
    junk.write_text("not a CA\n")
    with pytest.raises(ConfigError, match="client_ca_file"):
        build_context(TlsSettings(cert_file=pair.cert, key_file=pair.key, client_ca_file=junk))


def test_the_watcher_thread_stops(pki: TestPKI) -> None:
    pair = pki.server("proxy")
    server = ServerTLS(TlsSettings(cert_file=pair.cert, key_file=pair.key, reload_interval_seconds=0.05)).start()
    server.close()
    assert server._thread is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("proxy.example.org", False)],
)  # fmt: skip
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_http_beyond_loopback_is_refused_unless_the_admin_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clear text") as caught:
        ServerSettings(host="0.0.0.0")
    assert "server.tls" in str(caught.value) and "allow_plain_http" in str(caught.value)
    assert ServerSettings(host="0.0.0.0", allow_plain_http=True).host == "0.0.0.0"
    assert ServerSettings(host="0.0.0.0", unix_socket=tmp_path / "proxy.sock").unix_socket is not None
    tls = TlsSettings(cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem")
    assert ServerSettings(host="0.0.0.0", tls=tls).tls == tls


def test_serve_refuses_a_non_loopback_host_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slurmproxy.cli import main

    make_settings(tmp_path)
    assert main(["serve", "--config", str(tmp_path / "config.yaml"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "'0.0.0.0' is not a loopback address" in err


def test_paths_under_the_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    # Without the variable (an admin's `slurmproxy audit --config`), the settings load as written ...
    settings = make_settings(tmp_path, server={"tls": {"cert_file": "c.pem", "key_file": "$CREDENTIALS_DIRECTORY/k"}})
    assert settings.server.tls is not None and str(settings.server.tls.key_file) == "$CREDENTIALS_DIRECTORY/k"
    # ... and serve and check-config refuse them, naming the setting.
    from slurmproxy.commands.serve import validate

    with pytest.raises(ConfigError, match=r"server\.tls\.key_file: named in \$CREDENTIALS_DIRECTORY.*LoadCredential"):
        validate(tmp_path / "config.yaml")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/slurmproxy.service")
    tls = TlsSettings(
        cert_file="${CREDENTIALS_DIRECTORY}/tls.crt",
        key_file="$CREDENTIALS_DIRECTORY/tls.key",
    )
    assert tls.cert_file == Path("/run/credentials/slurmproxy.service/tls.crt")
    assert tls.key_file == Path("/run/credentials/slurmproxy.service/tls.key")


def test_the_tls_port_is_free_again_after_a_failed_start(tmp_path: Path) -> None:
    """A configuration whose TLS files do not load stops before binding (check-config says the same)."""
    from slurmproxy.cli import main

    port = free_port()
    make_settings(
        tmp_path,
        server={"port": port, "tls": {"cert_file": str(tmp_path / "none.pem"), "key_file": str(tmp_path / "k")}},
    )
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 2
    assert main(["serve", "--config", str(tmp_path / "config.yaml")]) == 2
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", port))


def test_the_tls_options_pickle_for_worker_processes(tmp_path: Path, pki: TestPKI) -> None:
    """uvicorn sends its config to each worker process (server.workers > 1) by pickling it."""
    import pickle

    pair = pki.server("proxy")
    settings = make_settings(tmp_path, server={"tls": {"cert_file": str(pair.cert), "key_file": str(pair.key)}})
    options = pickle.loads(pickle.dumps(uvicorn_options(settings)))  # noqa: S301 (our own bytes, as uvicorn does)
    loop = options["loop"]()
    try:
        assert loop.handshake_timeout == settings.server.header_timeout_seconds
    finally:
        loop.close()
    factory = options["ssl_context_factory"]
    context = factory(None, lambda: None)
    factory.server.close()
    assert isinstance(context, ssl.SSLContext) and context.minimum_version == ssl.TLSVersion.TLSv1_2
