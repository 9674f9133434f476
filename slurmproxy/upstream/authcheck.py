"""Telling "slurmrestd rejected the proxy's own Slurm credential" apart from the job's own errors.

The caller's token was already checked by the proxy, so when Slurm refuses the credential the proxy
presented (wrong ``jwt_hs256.key``, a token minted by a clock that is off, an expired service
token), it is the proxy's or the cluster's configuration that is wrong. Passing slurmrestd's answer
on would look like an error in the caller's request; the proxy answers 502 ``upstream_auth_failed``
instead, with a fixed message (never slurmrestd's body, never the Slurm token), and logs a warning.

What each generation answers (measured with devstack; see devstack/README.md):

* **any version, HTTP 401** ``Authentication failure``: slurmrestd's ``rest_auth`` plugin refused
  the proxy's headers; it never happens with correct headers.
* **24.11 (v0.0.40–v0.0.42), HTTP 511** with ``error_number`` 1007 ``Protocol authentication
  error``. 23.02–24.05 report the same error number with HTTP 500.
* **22.05 (v0.0.38), HTTP 500**, and no error that says "authentication": submit and cancel fail
  with 5005 ``Zero Bytes were transmitted or received`` (slurmctld drops the connection), updates
  with 1000 ``Unexpected message received``, reads with -1 ``Unspecified error``; the last two
  exactly as when slurmctld is down. So on v0.0.38 and older the proxy
  confirms: it sends ``DELETE /slurm/<version>/job/0`` with the same credential (job 0 never exists;
  slurmctld answers 2017 "Invalid job id" to an accepted credential, 5005 to a rejected one, 1800
  when unreachable). One probe per local account at a time, its result reused for
  ``PROBE_CACHE_SECONDS``; if it does not answer within ``PROBE_TIMEOUT_SECONDS`` slurmrestd's
  answer is passed on. Every other 500 (a bad partition: 2000, an unknown job: 2017, …) is
  slurmrestd's answer to the request and is passed on unchanged.
* **26.05 (v0.0.42–v0.0.45)**: as 24.11, HTTP 511 with 1007 (also on ``DELETE``). What changed
  elsewhere is not a credential rejection and passes on: refused submissions are 422, a mapped
  account unknown to slurmctld's host is 500 with 6010 ``Rejecting authentication of user nobody``,
  an unparsable query string is a text/plain 500.

Accounting (``/slurmdb/…``, slurmrestd asks slurmdbd with the same credential):

* **24.11 and 26.05**: a rejected credential is HTTP 502 with 7000 ``Unable to connect to database``,
  exactly as when slurmdbd is down. So the proxy confirms with ``GET /slurm/<version>/licenses``
  under the same credential (slurmctld answers 200 to an accepted credential, 511 to a rejected one),
  cached like the 22.05 probe; with slurmctld accepting it, the 502 is slurmdbd's and is passed on.
* **22.05**: 1007 in the body, with HTTP 500 (``…/accounts``) or even HTTP 200 (``…/jobs``): a 200
  from ``/slurmdb/v0.0.38/…`` is inspected too (its first 64 KiB; a larger answer is no rejection).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cachetools import TTLCache

from slurmproxy.core.flight import SingleFlight
from slurmproxy.core.slurmrest import credential_probe, is_legacy, requested_api
from slurmproxy.errors import ProxyError, UpstreamAuthFailed
from slurmproxy.upstream.client import ConnectionPool
from slurmproxy.upstream.exchange import UpstreamResponse, fetch

logger = logging.getLogger("slurmproxy.upstream")

INSPECTED_STATUSES = frozenset({401, 500, 511})
MAX_ERROR_BODY = 64 * 1024
PROBE_TIMEOUT_SECONDS = 3.0
PROBE_CACHE_SECONDS = 10.0
LOG_EVERY_SECONDS = 60.0

PROTOCOL_AUTHENTICATION_ERROR = 1007
ZERO_BYTES = 5005  # 22.05: slurmctld closed the connection without an answer
UNSPECIFIED = -1  # 22.05 read handlers: errno lost
UNEXPECTED_MESSAGE = 1000  # 22.05 job update
INVALID_JOB_ID = 2017
DATABASE_UNREACHABLE = 7000  # 24.11+: /slurmdb with a rejected credential, or slurmdbd down
ACCOUNTING = "slurmdb"
KNOWN = {
    PROTOCOL_AUTHENTICATION_ERROR: "Protocol authentication error",
    ZERO_BYTES: "Zero Bytes were transmitted or received",
    UNSPECIFIED: "Unspecified error",
    UNEXPECTED_MESSAGE: "Unexpected message received",
}
OPAQUE_ERRORS = (ZERO_BYTES, UNSPECIFIED, UNEXPECTED_MESSAGE)

Verdict = Literal["rejected", "ambiguous", "other"]


def slurm_errors(body: bytes) -> list[tuple[int | None, str]]:
    """(number, text) of every entry in a slurmrestd ``errors`` list (v0.0.38 spells the number 3 ways)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    entries = data.get("errors") if isinstance(data, dict) else None
    found: list[tuple[int | None, str]] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        number = next((entry[k] for k in ("error_number", "errno", "error_code") if k in entry), None)
        text = entry.get("error")
        found.append((number if isinstance(number, int) else None, text if isinstance(text, str) else ""))
    return found


def _is(entry: tuple[int | None, str], number: int) -> bool:
    return entry[0] == number or entry[1] == KNOWN.get(number)


def inspected(status: int, api: tuple[str, str] | None) -> bool:
    """Whether an answer of this status, to a request under ``api`` (``("slurm", "v0.0.42")``), may mean
    that the proxy's credential was rejected (see the module docstring)."""
    if status in INSPECTED_STATUSES:
        return True
    if api is None or api[0] != ACCOUNTING:
        return False
    return status == (200 if is_legacy(api[1]) else 502)


def classify(status: int, body: bytes, version: str | None, root: str = "slurm") -> tuple[Verdict, str]:
    """Whether an answer means the proxy's credential was rejected, and a fixed description of why."""
    if status == 401:
        return "rejected", "HTTP 401: slurmrestd refused the proxy's credential headers"
    errors = slurm_errors(body)
    if status == 511 or any(_is(e, PROTOCOL_AUTHENTICATION_ERROR) for e in errors):
        return "rejected", f"HTTP {status}: Slurm error {PROTOCOL_AUTHENTICATION_ERROR} {KNOWN[1007]}"
    opaque = version is not None and is_legacy(version)  # 22.05: auth failures look like other failures
    if status == 500 and opaque and any(_is(e, number) for e in errors for number in OPAQUE_ERRORS):
        return (
            "ambiguous",
            f"HTTP 500; a probe with the same credential got Slurm error {ZERO_BYTES} {KNOWN[ZERO_BYTES]}",
        )
    accounting = root == ACCOUNTING and version is not None and not is_legacy(version)
    if status == 502 and accounting and any(e[0] == DATABASE_UNREACHABLE for e in errors):
        return "ambiguous", "HTTP 502 from slurmdbd (7000); a probe of slurmctld with the same credential got HTTP 511"
    return "other", ""


@dataclass(frozen=True)
class Rejection:
    at: float
    status: int
    why: str


class UpstreamAuthCheck:
    """Inspects slurmrestd's 401/500/511 answers; raises UpstreamAuthFailed for rejections."""

    def __init__(
        self,
        client: ConnectionPool,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        probe_timeout: float = PROBE_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self._clock = clock
        self._wall = wall_clock
        self._probe_timeout = probe_timeout
        self._probes: TTLCache[tuple[str, str], bool | None] = TTLCache(
            maxsize=1024, ttl=PROBE_CACHE_SECONDS, timer=clock
        )
        self._flight: SingleFlight[tuple[str, str], bool | None] = SingleFlight()
        self._logged = float("-inf")
        self.last_rejection: Rejection | None = None
        self.rejections = 0

    async def _probe_once(self, version: str, headers: list[tuple[bytes, bytes]]) -> bool | None:
        """True: credential rejected; False: accepted; None: no clear answer (slurmctld down, timeout)."""
        method, path = credential_probe(version)
        try:
            status, body = await fetch(
                self._client,
                method,
                path,
                [(b"x-request-id", b"slurmproxy-credential-probe"), *headers],
                limit=MAX_ERROR_BODY,
                timeout=self._probe_timeout,
            )
        except ProxyError:
            return None
        errors = slurm_errors(body)
        if status in (401, 511) or any(_is(e, PROTOCOL_AUTHENTICATION_ERROR) for e in errors):
            return True
        if any(_is(e, ZERO_BYTES) for e in errors):
            return True
        if status == 404 or any(e[0] == INVALID_JOB_ID for e in errors):
            return False
        if status == 200 and method == "GET":
            return False
        return None

    async def _probe(self, version: str, user: str, headers: list[tuple[bytes, bytes]]) -> bool | None:
        key = (version, user)
        if key in self._probes:
            return self._probes[key]
        result = await self._flight.run(key, lambda: self._probe_once(version, headers))
        self._probes[key] = result
        return result

    def _note(self, status: int, why: str) -> None:
        self.rejections += 1
        self.last_rejection = Rejection(self._wall(), status, why)
        now = self._clock()
        if now - self._logged >= LOG_EVERY_SECONDS:
            self._logged = now
            logger.warning(
                "slurmrestd rejected the proxy's Slurm credential (%s; %d rejection(s) so far): check the "
                "Slurm JWT key, the clocks of this host and slurmctld, or the service token",
                why,
                self.rejections,
            )

    async def check(
        self, upstream: UpstreamResponse, *, path: str, user: str, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Raise UpstreamAuthFailed, after closing ``upstream``, if the credential was rejected."""
        api = requested_api(path)
        if not inspected(upstream.status_code, api):
            return
        encoding = dict((k.lower(), v) for k, v in upstream.headers).get(b"content-encoding", b"identity")
        body = await upstream.peek(MAX_ERROR_BODY) if encoding == b"identity" else None
        if body is None:
            return
        verdict, why = classify(upstream.status_code, body, api[1] if api else None, api[0] if api else "slurm")
        if verdict == "ambiguous":
            assert api is not None
            verdict = "rejected" if await self._probe(api[1], user, headers) else "other"
        if verdict != "rejected":
            return
        await upstream.aclose()
        self._note(upstream.status_code, why)
        error = UpstreamAuthFailed(
            f"slurmrestd rejected the proxy's credential for the mapped account ({why}). This is a proxy or "
            "cluster configuration problem (Slurm JWT key, clocks, service token), not a problem with your token"
        )
        error.upstream_status = upstream.status_code
        raise error

    def report(self) -> dict[str, Any]:
        """For readiness details."""
        last = self.last_rejection
        if last is None:
            return {"rejections": 0}
        at = datetime.fromtimestamp(last.at, UTC).isoformat(timespec="seconds")
        return {"rejections": self.rejections, "last": {"at": at, "status": last.status, "why": last.why}}
