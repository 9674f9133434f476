"""Deadlines for slow clients once a request has started: the body must arrive, and the answer be taken,
within ``server.body_timeout_seconds`` (the protocol, :mod:`slurmproxy.web.protocol`, bounds the headers)."""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slurmproxy.errors import ClientTooSlow, RequestTimeoutError
from slurmproxy.web.request import server_settings

logger = logging.getLogger("slurmproxy.httpserver")


class BodyDeadline:
    """Wraps an ASGI app so that a slow client cannot hold a request open for ever.

    * Reading: the request body must arrive within ``server.body_timeout_seconds`` of the app's
      first read, else the read raises :class:`RequestTimeoutError` (408, ``body_timeout``). Reads
      after the body is complete (a response waiting for ``http.disconnect``) are not bounded.
    * Writing: a client that stops reading the answer blocks the response when the socket's
      buffers are full. Each part of the answer must be taken within the same time, else the
      response is abandoned and the connection closed (the audit record was written before the
      response started), so slow readers cannot pin slurmrestd connections.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = server_settings(scope.get("state", {})).body_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        complete = False

        async def bounded_receive() -> Message:
            nonlocal deadline, complete
            if complete:
                return await receive()
            if deadline is None:
                deadline = loop.time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the request body did not arrive within {timeout:g} s",
                    reason="body_timeout",
                    headers={"Connection": "close"},
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        writing = _WriteDeadline(loop, timeout)

        async def bounded_send(message: Message) -> None:
            await writing.send(send, message)

        try:
            await self.app(scope, bounded_receive, bounded_send)
        except ClientTooSlow as exc:
            # uvicorn closes a connection whose response the app left unfinished.
            logger.warning("abandoning a response: %s (client %s)", exc, (scope.get("client") or ("-",))[0])
        finally:
            writing.close()


class _WriteDeadline:
    """Each send must complete within ``timeout``. One timer per response, not one per message
    (``asyncio.timeout`` around every send cost a tenth of a forwarded request's CPU): it fires only
    if a send is still blocked ``timeout`` after it began, and then cancels the response's task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._task = asyncio.current_task()
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return
        if self._loop.time() - self._since >= self._timeout:
            self._expired = True
            if self._task is not None:
                self._task.cancel()
        else:
            self._timer = self._loop.call_at(self._since + self._timeout, self._check)

    async def send(self, send: Send, message: Message) -> None:
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout, self._check)
        try:
            await send(message)
        except asyncio.CancelledError:
            if self._expired:
                raise ClientTooSlow(f"the client did not take the answer within {self._timeout:g} s") from None
            raise
        finally:
            self._since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
