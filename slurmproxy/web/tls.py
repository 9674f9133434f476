"""HTTPS on the proxy itself: the server's TLS context, re-read when its files change.

uvicorn hands one ``SSLContext`` to the event loop's server for good, so a new certificate cannot be
put in by replacing that object. Instead the context uvicorn gets is a dispatcher: its SNI callback
(called for every ClientHello, with or without a server name) points each new handshake at the
context in force now, and a watcher thread builds a fresh context when the certificate, key or
client CA files change, then swaps it in with one assignment. Connections already open keep the
TLS session they have; nothing is dropped. A replacement that does not load (a half-written key, a
certificate that does not match the key) is logged and the previous context stays in force.

Handshakes are bounded too: :func:`loop_factory` gives uvicorn an event loop whose TLS servers cut
a handshake that is not done within ``server.header_timeout_seconds``, so a client that connects
and stalls before any HTTP byte is treated like a slow-loris client (asyncio's default is 60 s).
The slow-client defences of :mod:`slurmproxy.web.protocol` start once the handshake is done.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any

from slurmproxy.config.settings import TlsSettings
from slurmproxy.errors import ConfigError

logger = logging.getLogger("slurmproxy.tls")

# TLS 1.2: forward-secret AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305), as in Mozilla's
# "intermediate" profile; TLS 1.3 suites are OpenSSL's defaults, all of them AEAD.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
Fingerprint = tuple[tuple[str, int, int, int] | None, ...]


def build_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context from the files; raises ConfigError naming the file at fault (never its content)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion[settings.min_version.replace(".", "_")]
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"server.tls: cannot read {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise ConfigError(f"server.tls: cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls: {settings.cert_file} and {settings.key_file} are not a PEM certificate (chain) and its "
            f"private key ({exc.reason or exc})"
        ) from None
    if settings.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"server.tls.client_ca_file: cannot load {settings.client_ca_file}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _fingerprint(settings: TlsSettings) -> Fingerprint:
    paths = [settings.cert_file, settings.key_file, settings.client_ca_file]
    out: list[tuple[str, int, int, int] | None] = []
    for path in paths:
        if path is None:
            out.append(None)
            continue
        try:
            st = os.stat(path)  # follows symlinks: a certbot or Kubernetes swap of the link counts
        except OSError:
            out.append((str(path), -1, -1, -1))
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ServerTLS:
    """The dispatcher context for uvicorn, the context in force, and the thread that reloads it."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._fingerprint = _fingerprint(settings)
        self.current = build_context(settings)
        self.reloads = 0
        self.failures = 0
        self.context = build_context(settings)
        self.context.sni_callback = self._select
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _select(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current
        if connection.context is not current:
            connection.context = current

    def check(self) -> bool:
        """Reload if the files changed since the last look; True if a new context is in force."""
        fingerprint = _fingerprint(self.settings)
        if fingerprint == self._fingerprint:
            return False
        try:
            context = build_context(self.settings)
        except ConfigError as exc:
            # A certificate and key replaced one after the other mismatch in between: try again next time.
            self.failures += 1
            logger.warning("TLS files changed but do not load; the previous certificate stays in force: %s", exc)
            return False
        self._fingerprint = fingerprint
        self.current = context
        self.reloads += 1
        logger.info("TLS certificate reloaded from %s", self.settings.cert_file)
        return True

    def start(self) -> ServerTLS:
        interval = self.settings.reload_interval_seconds
        if interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, args=(interval,), name="slurmproxy-tls", daemon=True)
            self._thread.start()
        return self

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # never let the watcher die: the next look may succeed
                logger.exception("checking the TLS files failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class ContextFactory:
    """uvicorn's ``ssl_context_factory``: called in each worker process, so each has its own watcher.
    A plain object (not a closure) because uvicorn pickles its config for worker processes."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.server: ServerTLS | None = None

    def __call__(self, config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        self.server = ServerTLS(self.settings).start()
        return self.server.context


class _HandshakeBoundedLoop:
    """Mixin: TLS servers created on this loop get a handshake deadline unless one is given."""

    handshake_timeout: float = 10.0

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout
        return await super().create_server(*args, **kwargs)  # type: ignore[misc]

    async def create_unix_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout
        return await super().create_unix_server(*args, **kwargs)  # type: ignore[misc]


def _new_loop(handshake_timeout: float) -> asyncio.AbstractEventLoop:
    import uvloop

    class Loop(_HandshakeBoundedLoop, uvloop.Loop):  # type: ignore[misc]
        pass

    loop = Loop()
    loop.handshake_timeout = handshake_timeout
    return loop


def loop_factory(handshake_timeout: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvicorn's ``loop`` option (a custom value is the loop factory itself): uvloop, with TLS handshakes
    bounded; a partial of a module function, so that it pickles for worker processes."""
    return functools.partial(_new_loop, handshake_timeout)


def uvicorn_tls_options(settings: TlsSettings | None, handshake_timeout: float) -> dict[str, Any]:
    """The uvicorn options that turn TLS on (none without ``server.tls``)."""
    if settings is None:
        return {}
    return {"ssl_context_factory": ContextFactory(settings), "loop": loop_factory(handshake_timeout)}
