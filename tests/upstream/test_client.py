from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from slurmproxy.errors import UpstreamBusy, UpstreamClosed, UpstreamConnectError, UpstreamReadTimeout
from slurmproxy.upstream.client import ConnectionPool, Origin
from tests.fakeupstream import FakeSlurmrestd

pytestmark = pytest.mark.anyio


def connect(
    url: str,
    *,
    max_connections: int = 16,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    idle_seconds: float = 5,
    clock: Callable[[], float] = time.monotonic,
) -> ConnectionPool:
    """A pool with the upstream settings' usual limits, or the ones a test gives."""
    return ConnectionPool(
        url,
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        idle_seconds=idle_seconds,
        clock=clock,
    )


@pytest.fixture(params=[pytest.param({}, id="asyncio"), pytest.param({"use_uvloop": True}, id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return ("asyncio", request.param)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlurmrestd]:
    server = await FakeSlurmrestd().start()
    yield server
    await server.stop()


async def test_get_and_keep_alive_reuse(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/slurm/v0.0.42/ping", json={"pings": []}, is_reusable=True)
    pool = connect(fake.url)
    for _ in range(20):
        response = await pool.request("GET", "/slurm/v0.0.42/ping", [(b"x-slurm-user-name", b"alice")])
        assert response.status_code == 200
        assert json.loads(await response.aread()) == {"pings": []}
    assert fake.connections == 1
    sent = fake.get_requests()[0]
    assert sent.headers["x-slurm-user-name"] == "alice"
    assert sent.headers["host"] == f"127.0.0.1:{fake.port}"
    await pool.aclose()


async def test_post_body_bytes_and_streamed(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/submit", method="POST", json={"job_id": 1}, is_reusable=True)
    pool = connect(fake.url)
    await (await pool.request("POST", "/submit", [], b'{"a":1}')).aread()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"b":'
        yield b"2}"

    await (await pool.request("POST", "/submit", [(b"content-length", b"7")], chunks())).aread()
    assert [r.content for r in fake.get_requests()] == [b'{"a":1}', b'{"b":2}']
    assert fake.get_requests()[0].headers["content-length"] == "7"
    with pytest.raises(ValueError, match="Content-Length"):
        await pool.request("POST", "/submit", [], chunks())
    await pool.aclose()


async def test_chunked_and_large_responses_stream_completely(fake: FakeSlurmrestd) -> None:
    big = bytes(range(256)) * 20000  # 5 MB: reading pauses and resumes
    fake.add_response(path="/big", content=big, chunked=True)
    fake.add_response(path="/big2", content=big)
    pool = connect(fake.url)
    for path in ("/big", "/big2"):
        response = await pool.request("GET", path, [])
        chunks = [c async for c in response.aiter_raw()]
        assert b"".join(chunks) == big and len(chunks) > 1
    assert fake.connections == 1
    await pool.aclose()


async def test_head_answer_has_no_body(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/x", content=b"0123456789", is_reusable=True)
    pool = connect(fake.url, read_timeout=2)
    response = await pool.request("HEAD", "/x", [])
    assert response.status_code == 200 and await response.aread() == b""
    assert (await (await pool.request("GET", "/x", [])).aread()) == b"0123456789"
    await pool.aclose()


async def test_connection_refused(tmp_path: Path) -> None:
    server = await FakeSlurmrestd().start()
    url = server.url
    await server.stop()
    with pytest.raises(UpstreamConnectError):
        await connect(url).request("GET", "/", [])
    with pytest.raises(UpstreamConnectError):
        await connect(f"unix:{tmp_path}/missing.sock").request("GET", "/", [])


async def test_read_timeout_and_the_connection_is_not_reused(fake: FakeSlurmrestd) -> None:
    fake.add_exception("hang", path="/slow")
    fake.add_response(path="/fast")
    pool = connect(fake.url, read_timeout=0.2)
    with pytest.raises(UpstreamReadTimeout):
        await pool.request("GET", "/slow", [])
    assert (await pool.request("GET", "/fast", [])).status_code == 200
    assert fake.connections == 2
    await pool.aclose()


@pytest.mark.parametrize("behaviour", ["close", "garbage"])
async def test_broken_answers(fake: FakeSlurmrestd, behaviour: str) -> None:
    fake.add_exception(behaviour, path="/x")
    with pytest.raises(UpstreamClosed):
        await connect(fake.url).request("POST", "/x", [], b"{}")


async def test_dead_idle_connection_is_skipped(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/x", is_reusable=True)
    pool = connect(fake.url)
    await (await pool.request("GET", "/x", [])).aread()
    for writer in list(fake._writers):  # the upstream drops its idle connection
        writer.transport.abort()
    await asyncio.sleep(0.05)
    await (await pool.request("GET", "/x", [])).aread()
    assert fake.connections == 2
    await pool.aclose()


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("DELETE", True), ("POST", False)])
async def test_reused_connection_closed_before_answering(fake: FakeSlurmrestd, method: str, retried: bool) -> None:
    fake.add_response(path="/warm")
    fake.add_exception("close", path="/x")  # the kept-alive connection dies on the next request
    fake.add_response(path="/x", is_optional=not retried)
    pool = connect(fake.url)
    await (await pool.request("GET", "/warm", [])).aread()
    if retried:
        assert (await pool.request(method, "/x", [])).status_code == 200
        assert fake.connections == 2
    else:
        with pytest.raises(UpstreamClosed):
            await pool.request(method, "/x", [], b"{}")
    await pool.aclose()


async def test_idle_connections_expire(fake: FakeSlurmrestd) -> None:
    now = [0.0]
    fake.add_response(path="/x", is_reusable=True)
    pool = connect(fake.url, idle_seconds=5, clock=lambda: now[0])
    await (await pool.request("GET", "/x", [])).aread()
    now[0] = 4.0
    await (await pool.request("GET", "/x", [])).aread()
    now[0] = 10.0
    await (await pool.request("GET", "/x", [])).aread()
    assert fake.connections == 2
    await pool.aclose()


async def test_pool_limit_waits_then_times_out(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/x", is_reusable=True)
    pool = connect(fake.url, max_connections=2, connect_timeout=0.2)
    held = [await pool.request("GET", "/x", []), await pool.request("GET", "/x", [])]
    with pytest.raises(UpstreamBusy):
        await pool.request("GET", "/x", [])
    await held[0].aread()
    assert (await pool.request("GET", "/x", [])).status_code == 200
    await held[1].aclose()
    await pool.aclose()


async def test_closing_a_response_early_drops_its_connection(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/big", content=b"x" * 3_000_000, is_reusable=True)
    pool = connect(fake.url)
    response = await pool.request("GET", "/big", [])
    await response.aclose()
    await (await pool.request("GET", "/big", [])).aread()
    assert fake.connections == 2
    await pool.aclose()


async def test_many_concurrent_requests(fake: FakeSlurmrestd) -> None:
    fake.add_response(path="/x", json={"ok": True}, is_reusable=True)
    pool = connect(fake.url, max_connections=8)

    async def one() -> bytes:
        return await (await pool.request("GET", "/x", [])).aread()

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert set(results) == {b'{"ok": true}'}
    assert fake.connections <= 8
    await pool.aclose()


async def test_unix_socket(tmp_path: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, str(tmp_path / "s.sock"))
    pool = connect(f"unix:{tmp_path}/s.sock")
    assert await (await pool.request("GET", "/", [])).aread() == b"ok"
    server.close()
    await pool.aclose()


def test_origin_and_header_injection() -> None:
    assert Origin.parse("http://127.0.0.1:6820").host_header == b"127.0.0.1:6820"
    assert Origin.parse("unix:/run/x.sock").uds == "/run/x.sock"
    assert Origin.parse("https://slurm.example.org").port == 443
    with pytest.raises(ValueError):
        Origin.parse("ftp://x")
    with pytest.raises(ValueError, match="user name or password"):
        Origin.parse("http://admin:secret@127.0.0.1:6820")


async def test_header_values_with_newlines_are_refused(fake: FakeSlurmrestd) -> None:
    with pytest.raises(ValueError, match="CR, LF"):
        await connect(fake.url).request("GET", "/", [(b"x-a", b"1\r\nX-SLURM-USER-NAME: root")])


class AnswerThenMore:
    """A server whose first answer on each connection is followed by ``extra`` (after ``pause``)."""

    def __init__(self, extra: bytes, pause: float) -> None:
        self.extra, self.pause = extra, pause
        self.writers: list[asyncio.StreamWriter] = []
        self.dropped = asyncio.Event()  # the client closed a connection that sent it the extra bytes

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + (b"" if self.pause else self.extra))
        if self.pause:
            await writer.drain()
            await asyncio.sleep(self.pause)
            writer.write(self.extra)
        await writer.drain()
        if len(self.writers) == 1 and await reader.read() == b"":
            self.dropped.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("pause", [0, 0.05], ids=["same-segment", "while-idle"])
async def test_bytes_after_an_answer_are_never_read_as_an_answer(pause: float) -> None:
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Injected: 1\r\n\r\nSTALE"
    server = AnswerThenMore(stale, pause)
    pool = connect(f"http://127.0.0.1:{await server.start()}")
    first = await pool.request("GET", "/a", [])
    assert await first.aread() == b"ok"
    assert (b"X-Injected", b"1") not in first.headers
    await asyncio.wait_for(server.dropped.wait(), timeout=30)  # the pool dropped the connection
    second = await pool.request("GET", "/b", [])
    assert await second.aread() == b"ok"  # a fresh connection's first answer, not the stale bytes
    assert len(server.writers) == 2
    await pool.aclose()
    await server.stop()


async def test_an_owners_share_is_given_back_when_a_request_fails(free_tcp_port: int) -> None:
    """Issue 15, item 4: a request that never got an answer must not keep counting against its owner."""
    pool = ConnectionPool(
        f"http://127.0.0.1:{free_tcp_port}",
        max_connections=4,
        connect_timeout=2,
        read_timeout=2,
        idle_seconds=5,
        max_per_owner=1,
    )
    for _ in range(3):  # refused connections, one after the other: never ConcurrencyLimitedError
        with pytest.raises(UpstreamConnectError):
            await pool.request("GET", "/x", [], owner="alice")
    assert pool.connections_in_use == 0
    await pool.aclose()
