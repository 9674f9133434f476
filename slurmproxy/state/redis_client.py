"""The Redis connection: redis-py's asyncio client, its password from a file, TLS as configured, no retries.

redis-py retries a failed command three times with backoff by default (even an authentication
failure), which would hide an outage inside a request for seconds. Here a command is retried once,
at once, and only when its connection broke (a restarted Redis closed it); a timeout is final, and
the :class:`~slurmproxy.state.guard.Guard` decides what a failure means. The pool blocks (up to the timeout)
when every connection is busy, instead of failing at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeoutError

from slurmproxy.config.settings import RedisSettings, StateSettings
from slurmproxy.state.guard import Guard
from slurmproxy.state.secrets import read_password

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics


def connect(settings: RedisSettings) -> aioredis.Redis:
    """A client (no connection is made until the first command)."""
    options: dict[str, Any] = {
        "username": settings.username,
        "password": read_password(settings.password_file, "state.redis.password_file"),
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.connect_timeout_seconds,
        # One retry, on a broken connection only (a Redis restart closed it): never on a timeout.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "client_name": "slurmproxy",
    }
    if settings.url.startswith("rediss://"):
        options.update(
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            ssl_ca_certs=str(settings.ca_file) if settings.ca_file else None,
            ssl_certfile=str(settings.cert_file) if settings.cert_file else None,
            ssl_keyfile=str(settings.key_file) if settings.key_file else None,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.max_connections, timeout=settings.timeout_seconds, **options
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def classify(exc: BaseException) -> str | None:
    if isinstance(exc, RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "unreachable"
    if isinstance(exc, RedisError):
        return "error"
    return None


def redis_guard(settings: StateSettings, client: aioredis.Redis, metrics: Metrics | None) -> Guard:
    assert settings.redis is not None
    return Guard(
        "Redis",
        timeout=settings.redis.timeout_seconds,
        retry_seconds=settings.retry_seconds,
        classify=classify,
        metrics=metrics,
        probe=client.ping,
    )
