"""ALISE, KIT's account-linking service (https://github.com/m-team-kit/alise), as a mapping backend.

One lookup per identity::

    GET {url}/api/v1/target/{site}/mapping/issuer/{sha1_hex(iss)}/user/{quote_plus(sub)}?apikey=KEY

How answers are read:

* HTTP 200 with ``internal.username``, for an ``external`` identity equal to the caller's
  (issuer and subject): the linked local account. The guard checks it like any other answer.
* HTTP 401 ``{"detail": [{"type": "not-mapped"}]}``: not linked; the rule's next step is tried.
* HTTP 401 ``{"detail": [{"type": "invalid"}]}`` (a wrong API key), HTTP 200 ``{"error": …}`` (ALISE's
  form for any exception), any other status, a body that is not JSON, a timeout or a connection
  error: ALISE is failing. With ``outage: fail_closed`` that is a 503; with ``outage: last_known``
  the mapping last found for this identity is served if it is younger than
  ``last_known_max_age_seconds``, otherwise 503.
* An answer for another identity, or one without a usable ``internal.username``: refused (never
  replaced by a later step).

Found mappings are reused for ``cache_seconds``, "not linked" for ``miss_cache_seconds``; ALISE's
own cache headers are ignored. The last-known answers live in a :class:`LastKnownStore`: this
process's memory (embedded), or PostgreSQL shared by every replica (``slurmproxy.state``), so that
``outage: last_known`` serves the same answer, with its age, wherever the request lands.
Concurrent lookups of one identity share one request. The API key travels only in the query
string: URLs are logged and reported without it, and the ``httpx`` logger's request lines are
redacted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote_plus

import httpx
from cachetools import LRUCache, TTLCache

from slurmproxy import __version__
from slurmproxy.config.settings import AliseSettings
from slurmproxy.core.flight import SingleFlight
from slurmproxy.errors import AliseOutage, ConfigError, DependencyError, IdentityMappingError

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

logger = logging.getLogger("slurmproxy.identity.alise")
Key = tuple[str, str]
_APIKEY = re.compile(r"(apikey=)[^&\s\"'#]*", re.IGNORECASE)


class RedactQuery(logging.Filter):
    """Drops query strings (where ALISE's API key travels) from the ``httpx`` logger's request lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = _APIKEY.sub(r"\1REDACTED", record.msg)
        return True


def _redact(value: object) -> object:
    if isinstance(value, httpx.URL) and value.query:
        return value.copy_with(query=None)
    if isinstance(value, str | bytes) and b"apikey=" in (value if isinstance(value, bytes) else value.encode()):
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        return _APIKEY.sub(r"\1REDACTED", text)
    return value


def install_redaction() -> None:
    for name in ("httpx", "httpcore"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactQuery) for f in log.filters):
            log.addFilter(RedactQuery())


def read_apikey(settings: AliseSettings) -> str:
    try:
        key = settings.apikey_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"identity.alise: cannot read apikey_file {settings.apikey_file}: {exc.strerror}") from exc
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"identity.alise: apikey_file {settings.apikey_file} must hold one key on one line")
    return key


@dataclass(frozen=True, slots=True)
class AliseAnswer:
    """``username`` None means "not linked". ``via``: asked now, from the cache, or last-known during an outage."""

    username: str | None
    via: Literal["alise", "cache", "last_known"]
    age_seconds: float = 0.0


class LastKnownStore(Protocol):
    """Where ALISE's last found answer per identity is kept, for ``outage: last_known``."""

    async def remember(self, service: str, issuer: str, subject: str, username: str) -> None:
        """Keep ``username`` as found now; never raises (a failure to remember only costs availability later)."""

    async def recall(self, service: str, issuer: str, subject: str) -> tuple[str, float] | None:
        """The last answer and its age in seconds, or None; never raises (a store that cannot answer says None)."""


class MemoryLastKnown:
    """The embedded :class:`LastKnownStore`: this process's memory, at most ``size`` identities (LRU)."""

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._answers: LRUCache[tuple[str, str, str], tuple[str, float]] = LRUCache(size)

    async def remember(self, service: str, issuer: str, subject: str, username: str) -> None:
        self._answers[(service, issuer, subject)] = (username, self._clock())

    async def recall(self, service: str, issuer: str, subject: str) -> tuple[str, float] | None:
        found = self._answers.get((service, issuer, subject))
        return None if found is None else (found[0], self._clock() - found[1])


class AliseClient:
    def __init__(
        self,
        name: str,
        settings: AliseSettings,
        http: httpx.AsyncClient,
        apikey: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        last_known: LastKnownStore | None = None,
    ) -> None:
        self._metrics = metrics
        self.name = name
        self.settings = settings
        self._http = http
        self._apikey = apikey
        self._clock = clock
        size = settings.cache_size
        self._hits: TTLCache[Key, str] = TTLCache(size, max(settings.cache_seconds, 0.001), timer=clock)
        self._misses: TTLCache[Key, bool] = TTLCache(size, max(settings.miss_cache_seconds, 0.001), timer=clock)
        self._last_known = last_known if last_known is not None else MemoryLastKnown(size, clock)
        self._flight: SingleFlight[Key, AliseAnswer] = SingleFlight()
        install_redaction()

    @classmethod
    def create(cls, name: str, settings: AliseSettings, **kwargs: Any) -> AliseClient:
        """A client with its own connection pool and timeouts; the API key is read from its file."""
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=settings.max_connections))
        metrics: Metrics | None = kwargs.get("metrics")
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds),
            transport=metrics.transport("alise", transport) if metrics is not None else transport,
            follow_redirects=False,
            trust_env=False,
            headers={"Accept": "application/json", "User-Agent": f"slurmproxy/{__version__}"},
        )
        return cls(name, settings, http, read_apikey(settings), **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    def url_for(self, issuer: str, subject: str) -> str:
        """The lookup URL without its query (the API key): safe to log and to show."""
        digest = hashlib.sha1(issuer.encode(), usedforsecurity=False).hexdigest()
        return (
            f"{self.settings.url}/api/v1/target/{quote_plus(self.settings.site)}/mapping/issuer/{digest}"
            f"/user/{quote_plus(subject)}"
        )

    async def lookup(self, issuer: str, subject: str) -> AliseAnswer:
        key = (issuer, subject)
        if self._metrics is not None:
            self._metrics.cache_lookup("alise", hit=key in self._hits or key in self._misses)
        if key in self._hits:
            return AliseAnswer(self._hits[key], "cache")
        if key in self._misses:
            return AliseAnswer(None, "cache")
        if "/" in subject:
            # ALISE's ASGI stack decodes %2F before routing: such a subject cannot be looked up at all.
            logger.info("ALISE %s: subject %r contains '/', which ALISE cannot look up; not linked", self.name, subject)
            return AliseAnswer(None, "alise")
        return await self._flight.run(key, lambda: self._resolve(key))

    async def _resolve(self, key: Key) -> AliseAnswer:
        try:
            username = await self._ask(*key)
        except AliseOutage as outage:
            return await self._during_outage(key, outage)
        if username is None:
            self._misses[key] = True
        else:
            self._hits[key] = username
            if self.settings.outage == "last_known":
                await self._last_known.remember(self.name, *key, username)
        return AliseAnswer(username, "alise")

    async def _during_outage(self, key: Key, outage: AliseOutage) -> AliseAnswer:
        logger.warning("ALISE %s failed: %s (%s)", self.name, outage.detail, self.url_for(*key))
        found = await self._last_known.recall(self.name, *key) if self.settings.outage == "last_known" else None
        if found is not None:
            username, age = found
            if age <= self.settings.last_known_max_age_seconds:
                logger.warning("ALISE %s: serving the mapping last seen %.0f s ago for %s", self.name, age, key[1])
                return AliseAnswer(username, "last_known", round(age, 3))
        raise DependencyError(
            f"the account-linking service (ALISE {self.name}) failed: {outage.detail}", reason=outage.reason
        ) from outage

    async def _ask(self, issuer: str, subject: str) -> str | None:
        url = self.url_for(issuer, subject)
        try:
            response = await self._http.get(url, params={"apikey": self._apikey})
        except httpx.TimeoutException as exc:
            raise AliseOutage(f"no answer within {self.settings.timeout_seconds} s", reason="alise_timeout") from exc
        except httpx.HTTPError as exc:
            raise AliseOutage(f"unreachable ({type(exc).__name__})", reason="alise_unreachable") from exc
        return self._read(response, issuer, subject)

    def _read(self, response: httpx.Response, issuer: str, subject: str) -> str | None:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 401 and isinstance(body, dict):
            kind = _detail_type(body)
            if kind == "not-mapped":
                return None
            if kind == "invalid":
                raise AliseOutage("ALISE refused the API key (invalid apikey)", reason="alise_rejected_key")
        if response.status_code != 200:
            raise AliseOutage(f"HTTP {response.status_code}", reason="alise_error")
        if not isinstance(body, dict):
            raise AliseOutage("the answer is not a JSON object", reason="alise_error")
        if "error" in body:
            raise AliseOutage(f"ALISE reported an error: {str(body['error'])[:200]!r}", reason="alise_error")
        external = body.get("external")
        if not isinstance(external, list) or not any(
            isinstance(e, dict) and e.get("iss") == issuer and e.get("sub") == subject for e in external
        ):
            raise AliseOutage("the answer is not about the identity asked for", reason="alise_error")
        internal = body.get("internal")
        username = internal.get("username") if isinstance(internal, dict) else None
        if not isinstance(username, str) or not username:
            raise IdentityMappingError(
                f"ALISE {self.name} links this identity but gives no usable internal.username",
                reason="invalid_username",
            )
        return username


def _detail_type(body: dict[str, Any]) -> str | None:
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        kind = detail[0].get("type")
        return kind if isinstance(kind, str) else None
    return None
