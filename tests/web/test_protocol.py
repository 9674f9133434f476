"""The server's defences against slow and abusive clients, on a real uvicorn server in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from pytest_httpx import HTTPXMock
from starlette.types import Message, Receive, Scope, Send

from devstack._proc import free_port
from slurmproxy.commands.serve import uvicorn_options
from slurmproxy.config.settings import ServerSettings
from slurmproxy.errors import RequestTimeoutError
from slurmproxy.pipeline.app import create_app
from slurmproxy.web.deadlines import BodyDeadline
from slurmproxy.web.protocol import HOOKS, PROTOCOL
from tests.audit.test_record import validate
from tests.helpers import ISSUER, JWKS_URI, Signer, discovery, make_settings

pytestmark = pytest.mark.anyio
GET_LIVE = b"GET /_slurmproxy/live HTTP/1.1\r\nHost: proxy\r\n\r\n"


@asynccontextmanager
async def served(tmp_path: Path, httpx_mock: HTTPXMock, **server: Any) -> AsyncIterator[tuple[int, Path]]:
    signer = Signer()
    httpx_mock.add_response(
        url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True, is_optional=True
    )
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True, is_optional=True)
    settings = make_settings(tmp_path, server={"header_timeout_seconds": 0.5, **server})
    port = free_port()
    options = uvicorn_options(settings)
    options.update(loop="asyncio", log_config=None, timeout_graceful_shutdown=5)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, lifespan="on", **options)
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve())
    while not instance.started:
        await asyncio.sleep(0.01)
    try:
        yield port, tmp_path / "audit.log"
    finally:
        instance.should_exit = True
        await asyncio.wait_for(task, 30)


async def exchange(port: int, data: bytes = b"", *, wait: float = 30) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if data:
            writer.write(data)
            with contextlib.suppress(ConnectionError):  # the server may answer and close before reading it all
                await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


def answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_serve_uses_the_guarded_protocol() -> None:
    settings = SimpleNamespace(server=ServerSettings(keep_alive_seconds=7))
    options = uvicorn_options(settings)  # type: ignore[arg-type]
    assert options["http"] == PROTOCOL and options["ws"] == "none" and options["timeout_keep_alive"] == 7


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        pytest.param(b"GET /slurm/v0.0.38/ping HTTP/1.1\r\nHost: proxy\r\nX-A", 408, "header_timeout", id="partial"),
        pytest.param(b"GET /slurm/v0.0.38/ping HTTP/1.1\r\nX: " + b"a" * 70000, 431, "header_too_large", id="big"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: p\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(9000)) + b"\r\n",
            431,
            "header_too_large",
            id="many",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nX-A: a\rX-SLURM-USER-NAME: root\r\n\r\n", 400, "bad_http", id="bare-cr"),
        pytest.param(b"GET / HTTP/1.1\r\nX-A: a\r\n X-SLURM-USER-NAME: root\r\n\r\n", 400, "bad_http", id="fold"),
        pytest.param(b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400, "bad_http", id="nul"),
        pytest.param(b"GET /?a=\r\nX-SLURM-USER-NAME: root HTTP/1.1\r\n\r\n", 400, "bad_http", id="http-0.9"),
        pytest.param(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_http",
            id="smuggling",
        ),
    ],
)
async def test_refusals_are_json_and_audited(
    tmp_path: Path, httpx_mock: HTTPXMock, request_bytes: bytes, status: int, reason: str
) -> None:
    async with served(tmp_path, httpx_mock) as (port, audit):
        raw = await exchange(port, request_bytes)
        metrics = (await exchange(port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")).decode()
    code, headers, body = answer(raw)
    assert f'reason="{reason}"' in metrics and f'status="{status}"' in metrics
    assert code == status and headers["connection"] == "close"
    assert body["slurmproxy"]["reason"] == reason and body["errors"][0]["source"] == "slurmproxy"
    (record,) = records(audit)
    validate(record)
    assert record["status"] == status and record["reason"] == reason and record["decision"] == "deny"
    assert record["request_id"] == headers["x-request-id"] == body["slurmproxy"]["request_id"]


async def test_a_connection_that_sends_nothing_is_closed_silently(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    async with served(tmp_path, httpx_mock) as (port, audit):
        assert await exchange(port) == b""
    assert records(audit) == []


async def test_headers_dripped_slowly_still_time_out(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    async with served(tmp_path, httpx_mock) as (port, audit):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /_slurmproxy/live HTTP/1.1\r\n")
        raw = b""
        for _ in range(200):  # a byte every 50 ms never resets the deadline
            writer.write(b"X")
            try:
                raw = await asyncio.wait_for(reader.read(65536), 0.05)
            except TimeoutError:
                continue
            raw += await asyncio.wait_for(reader.read(), 30)
            break
        writer.close()
    assert answer(raw)[0] == 408
    assert [r["reason"] for r in records(audit)] == ["header_timeout"]


async def test_keep_alive_then_a_slow_second_request(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    async with served(tmp_path, httpx_mock, keep_alive_seconds=30) as (port, audit):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET_LIVE)
        first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 30)
        await asyncio.sleep(1.0)  # idle between requests is the keep-alive timer's business
        writer.write(b"GET /_slurmproxy/live HTTP/1.1\r\n")
        rest = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert answer(rest)[0] == 408


async def test_beyond_max_connections_requests_get_503(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    async with served(tmp_path, httpx_mock, max_connections=2, header_timeout_seconds=30) as (port, audit):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        raw = await exchange(port, GET_LIVE)
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.2)
        again = await exchange(port, GET_LIVE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    code, headers, body = answer(raw)
    assert code == 503 and headers["retry-after"] == "1" and body["slurmproxy"]["reason"] == "overloaded"
    assert again.startswith(b"HTTP/1.1 200")
    assert [r["reason"] for r in records(audit)] == ["overloaded"]
    validate(records(audit)[0])


def _state(timeout: float) -> dict[str, Any]:
    server = ServerSettings(body_timeout_seconds=timeout)
    return {"runtime": SimpleNamespace(settings=SimpleNamespace(server=server))}


async def test_a_slow_body_raises_408_at_the_deadline() -> None:
    seen: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["more_body"] is True
        try:
            await receive()
        except RequestTimeoutError as exc:
            seen.append(exc)

    messages = [{"type": "http.request", "body": b"x", "more_body": True}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    await BodyDeadline(app)({"type": "http", "state": _state(0.05)}, receive, send)
    (error,) = seen
    assert isinstance(error, RequestTimeoutError)
    assert error.reason == "body_timeout" and error.status_code == 408 and error.headers["Connection"] == "close"


async def test_reads_after_the_body_are_not_bounded() -> None:
    later = asyncio.Event()
    got: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        got.append((await receive())["type"])

    messages = [{"type": "http.request", "body": b"x", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await later.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    async def release() -> None:
        await asyncio.sleep(0.2)
        later.set()

    releaser = asyncio.create_task(release())
    await BodyDeadline(app)({"type": "http", "state": _state(0.05)}, receive, send)
    await releaser
    assert got == ["http.disconnect"]


async def test_a_client_that_stops_reading_is_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    finished: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        finished.append(True)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(3600)  # the socket's buffers are full: the client reads nothing

    async def receive() -> Message:
        raise AssertionError("not read")

    with caplog.at_level(logging.WARNING, "slurmproxy.httpserver"):
        await BodyDeadline(app)({"type": "http", "state": _state(0.05), "client": ("192.0.2.1", 1)}, receive, send)
    assert finished == []
    assert "did not take the answer" in caplog.text and "192.0.2.1" in caplog.text


def test_the_protocol_hooks_this_module_overrides_still_exist_in_uvicorn() -> None:
    """httpserver subclasses uvicorn's private protocol: a release that renames a hook must fail here."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from slurmproxy.web.protocol import GuardedHttpToolsProtocol

    for name in HOOKS:
        assert callable(getattr(HttpToolsProtocol, name, None)), f"uvicorn's HttpToolsProtocol has no {name}"
    overridden = {name for name, value in vars(GuardedHttpToolsProtocol).items() if callable(value)} - {"__init__"}
    private = {name for name in overridden if name.startswith("_")}
    assert overridden - private == set(HOOKS)
