"""A stand-in slurmrestd for unit tests, served over real HTTP/1.1 on loopback.

The proxy's upstream client is not httpx, so pytest-httpx cannot answer for slurmrestd; this server
does, with the same habits: register answers with ``add_response`` / ``add_exception`` (matched by
URL or path and method, each used once unless ``is_reusable``), read what arrived with
``get_requests()`` (``httpx.Request`` objects, headers exactly as sent), and at the end of a test
``check()`` fails on registered answers nobody asked for and on requests nobody expected.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import threading
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httptools
import httpx

Behaviour = Literal["respond", "close", "hang", "garbage"]
HOLD_SECONDS = 60.0


@dataclass
class Answer:
    method: str | None
    path: str | None
    status_code: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    behaviour: Behaviour = "respond"
    reusable: bool = False
    optional: bool = False
    chunked: bool = False
    delay: float = 0.0
    hold: threading.Event | None = None  # the answer waits until the test sets it (at most HOLD_SECONDS)
    used: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or self.path == path)


class _RequestParser:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes, bool]] = []
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.done.append((method, self.url, self.headers, bytes(self.body), self.parser.should_keep_alive()))
        self._reset()


class FakeSlurmrestd:
    """Listens on 127.0.0.1; ``base_url`` is the URL answers may be registered under."""

    def __init__(self, base_url: str = "http://slurmrestd.test:6820") -> None:
        self.base_url = base_url.rstrip("/")
        self.answers: list[Answer] = []
        self.requests: list[httpx.Request] = []
        self.unexpected: list[str] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeSlurmrestd:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _path(self, url: str | None, path: str | None) -> str | None:
        if url is not None:
            if not url.startswith(self.base_url):
                raise ValueError(f"{url} is not under {self.base_url}")
            return url[len(self.base_url) :] or "/"
        return path

    def add_response(
        self,
        *,
        url: str | None = None,
        path: str | None = None,
        method: str | None = None,
        status_code: int = 200,
        json: Any = None,
        content: bytes | None = None,
        text: str | None = None,
        headers: dict[str, str] | None = None,
        is_reusable: bool = False,
        is_optional: bool = False,
        chunked: bool = False,
        delay: float = 0.0,
        hold: threading.Event | None = None,
    ) -> None:
        body = jsonlib.dumps(json).encode() if json is not None else (content or (text or "").encode())
        raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        if json is not None and not any(k == b"content-type" for k, _ in raw):
            raw.append((b"content-type", b"application/json"))
        self.answers.append(
            Answer(
                method,
                self._path(url, path),
                status_code,
                raw,
                body,
                "respond",
                is_reusable,
                is_optional,
                chunked,
                delay,
                hold,
            )
        )

    def add_exception(
        self,
        behaviour: str,
        *,
        url: str | None = None,
        path: str | None = None,
        method: str | None = None,
        is_reusable: bool = False,
        is_optional: bool = False,
    ) -> None:
        """``close``: drop the connection without answering; ``hang``: never answer; ``garbage``: not HTTP."""
        kinds: dict[str, Behaviour] = {"close": "close", "hang": "hang", "garbage": "garbage"}
        if behaviour not in kinds:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        self.answers.append(
            Answer(
                method, self._path(url, path), behaviour=kinds[behaviour], reusable=is_reusable, optional=is_optional
            )
        )

    def get_requests(self) -> list[httpx.Request]:
        return list(self.requests)

    def get_request(self) -> httpx.Request | None:
        assert len(self.requests) <= 1, f"{len(self.requests)} upstream requests, not one"
        return self.requests[0] if self.requests else None

    def check(self) -> None:
        unused = [a for a in self.answers if not a.used and not a.optional]
        assert not unused, f"registered upstream answers never requested: {[(a.method, a.path) for a in unused]}"
        assert not self.unexpected, f"upstream requests without a registered answer: {self.unexpected}"

    def _answer(self, method: str, path: str) -> Answer | None:
        for answer in self.answers:
            if answer.matches(method, path) and (answer.reusable or not answer.used):
                answer.used += 1
                return answer
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        parser = _RequestParser()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                parser.parser.feed_data(data)
                while parser.done:
                    method, target, headers, body, keep_alive = parser.done.pop(0)
                    if not await self._respond(writer, method, target, headers, body) or not keep_alive:
                        return
        except (ConnectionError, httptools.HttpParserError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _respond(
        self, writer: asyncio.StreamWriter, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bool:
        parts = urlsplit(target.decode("latin-1"))
        self.requests.append(
            httpx.Request(method, self.base_url + target.decode("latin-1"), headers=headers, content=body)
        )
        answer = self._answer(method, parts.path)
        if answer is None:
            self.unexpected.append(f"{method} {target.decode('latin-1')}")
            answer = Answer(None, None, 599, [], b'{"errors":[{"error":"no answer registered"}]}')
        if answer.behaviour == "close":
            return False
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.hold is not None:
            await asyncio.to_thread(answer.hold.wait, HOLD_SECONDS)
        if answer.behaviour == "hang":
            assert self._stopping is not None
            await self._stopping.wait()
            return False
        if answer.behaviour == "garbage":
            writer.write(b"this is not http\r\n\r\n")
            return False
        lines = [f"HTTP/1.1 {answer.status_code} X".encode()]
        lines += [k + b": " + v for k, v in answer.headers]
        if answer.chunked:
            lines.append(b"transfer-encoding: chunked")
            payload = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in _pieces(answer.body)) + b"0\r\n\r\n"
        else:
            lines.append(b"content-length: " + str(len(answer.body)).encode())
            payload = answer.body
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if method == "HEAD" else payload))
        await writer.drain()
        return True


def _pieces(body: bytes, size: int = 1000) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)] or []


class ThreadedFakeSlurmrestd:
    """The same server on its own event loop in a thread, so that sync and async tests can use it."""

    def __init__(self, base_url: str = "http://slurmrestd.test:6820") -> None:
        self.fake = FakeSlurmrestd(base_url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-slurmrestd", daemon=True)

    def start(self) -> ThreadedFakeSlurmrestd:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Stop serving: later requests find nothing listening (a slurmrestd that is down)."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return self.fake.url

    @property
    def connections(self) -> int:
        return self.fake.connections

    def add_response(self, **kwargs: Any) -> None:
        self.fake.add_response(**kwargs)

    def add_exception(self, behaviour: str, **kwargs: Any) -> None:
        self.fake.add_exception(behaviour, **kwargs)

    def get_requests(self) -> list[httpx.Request]:
        return self.fake.get_requests()

    def get_request(self) -> httpx.Request | None:
        return self.fake.get_request()

    def check(self) -> None:
        self.fake.check()
