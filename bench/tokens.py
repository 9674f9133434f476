"""The proxy's own cost of token handling per request, and its provider calls under concurrency.

    .venv/bin/python -m bench.tokens [--quick]

Runs :class:`slurmproxy.tokens.TokenValidator` in-process, exactly as the proxy builds it
(``build_validator``), against an in-memory provider (``httpx.MockTransport``) that answers
discovery, keys, userinfo and introspection with real RS256 keys and Check-in-shaped answers. The
in-process provider answers at once for the cost figures, so they are the proxy's own work:
header parsing, hashing, cache, signature verification, claim checks, building and parsing the
userinfo/introspection HTTP exchange. For the concurrency figures it answers after a delay, so
that concurrent requests really overlap. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import secrets
import statistics
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import parse_qs

import httpx
from joserfc import jwt
from joserfc.jwk import RSAKey

from slurmproxy.config.settings import Settings
from slurmproxy.tokens.validator import TokenValidator, build_validator

ISSUER = "https://aai.egi.eu/auth/realms/egi"
BASE = f"{ISSUER}/protocol/openid-connect"
ENTITLEMENTS = [
    "urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu",
    "urn:mace:egi.eu:group:vo.example.org:hpc:role=member#aai.egi.eu",
    "urn:mace:egi.eu:res:rcauth#aai.egi.eu",
]


class Provider:
    """Check-in's endpoints in memory: counts calls, answers after ``delay`` seconds."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig", "alg": "RS256"}, private=True)
        self.calls: Counter[str] = Counter()
        self.delay = 0.0
        self.opaque: dict[str, str] = {}

    def token(self, sub: str = "0f3c2a7e@egi.eu", **extra: Any) -> str:
        """A Check-in-shaped access token (~1 KB): no aud, no entitlements."""
        now = int(time.time())
        claims = {
            "exp": now + 3600,
            "iat": now,
            "auth_time": now,
            "jti": secrets.token_hex(16),
            "iss": ISSUER,
            "sub": sub,
            "typ": "Bearer",
            "azp": "some-portal",
            "session_state": secrets.token_hex(16),
            "scope": "openid profile email eduperson_entitlement voperson_id",
            "sid": secrets.token_hex(16),
            **extra,
        }
        return jwt.encode({"alg": "RS256", "typ": "JWT", "kid": "k1"}, claims, self.key, algorithms=["RS256"])

    def opaque_token(self, sub: str) -> str:
        token = secrets.token_urlsafe(32)
        self.opaque[token] = sub
        return token

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        name = path.rsplit("/", 1)[-1]
        self.calls[name] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if path.endswith("openid-configuration"):
            return httpx.Response(200, json=_discovery())
        if name == "certs":
            return httpx.Response(200, json={"keys": [self.key.as_dict(private=False)]})
        if name == "userinfo":
            token = request.headers["authorization"].removeprefix("Bearer ")
            if token in self.opaque:
                return httpx.Response(200, json=_person(self.opaque[token]))
            sub = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["sub"]
            return httpx.Response(200, json=_person(sub))
        if name == "introspect":
            token = parse_qs(request.content.decode())["token"][0]
            sub = self.opaque.get(token)
            if sub is None:
                return httpx.Response(200, json={"active": False})
            answer = {"active": True, "iss": ISSUER, "token_type": "Bearer", "exp": int(time.time()) + 3600}
            return httpx.Response(200, json={**answer, **_person(sub)})
        return httpx.Response(404)


def _discovery() -> dict[str, Any]:
    return {
        "issuer": ISSUER,
        "jwks_uri": f"{BASE}/certs",
        "userinfo_endpoint": f"{BASE}/userinfo",
        "introspection_endpoint": f"{BASE}/token/introspect",
    }


def _person(sub: str) -> dict[str, Any]:
    return {
        "sub": sub,
        "voperson_id": sub,
        "name": "Jane Doe",
        "preferred_username": "jdoe",
        "email": "jane.doe@example.org",
        "email_verified": True,
        "eduperson_entitlement": ENTITLEMENTS,
    }


# The cost of validating fresh tokens is measured here, not the introspection budget that bounds how
# many a worker sends to its provider (docs/operations.md): give the benchmark's one client all of it.
UNBUDGETED = {
    "introspection_concurrency": 100_000,
    "introspection_per_second": 1e9,
    "introspection_burst": 1_000_000,
    "introspection_per_client_per_second": 1e9,
    "introspection_per_client_burst": 1_000_000,
}


def settings(secret_file: Path, oidc: dict[str, Any] | None = None, **issuer: Any) -> Settings:
    return Settings.model_validate(
        {
            "oidc": {
                **UNBUDGETED,
                **(oidc or {}),
                "issuers": [
                    {
                        "preset": "egi-checkin",
                        "client_id": "bench",
                        "client_secret_file": str(secret_file),
                        **issuer,
                    }
                ],
            },
            "upstream": {"url": "http://127.0.0.1:1", "jwt_key_file": "/dev/null"},
        }
    )


def _us_per_call(seconds: float, calls: int) -> float:
    return seconds / calls * 1e6


async def _time_each(calls: list[Callable[[], Awaitable[object]]]) -> float:
    started = time.perf_counter()
    for one in calls:
        await one()
    return time.perf_counter() - started


async def cost(provider: Provider, validator: TokenValidator, quick: bool) -> list[tuple[str, float, str]]:
    """(what, µs per request, note) for cached and uncached token handling."""
    rows: list[tuple[str, float, str]] = []
    rounds, cached_calls, fresh = (3, 20_000, 200) if quick else (5, 100_000, 1000)

    header = [f"Bearer {provider.token()}"]
    await validator.authenticate(header)  # warm: keys, discovery, this token's userinfo
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(cached_calls):
            await validator.authenticate(header)
        samples.append(_us_per_call(time.perf_counter() - started, cached_calls))
    rows.append(("cached token (any source)", statistics.median(samples), f"median of {rounds}x{cached_calls}"))

    for label, source in [("uncached JWT, claims from the token", "token"), ("uncached JWT + userinfo", "userinfo")]:
        tokens = [provider.token(eduperson_entitlement=ENTITLEMENTS) for _ in range(fresh)]
        validator_for = _VALIDATORS[source]
        await validator_for.authenticate([f"Bearer {provider.token()}"])  # keys and discovery loaded
        before = provider.calls["userinfo"]
        seconds = await _time_each([_auth(validator_for, t) for t in tokens])
        calls = provider.calls["userinfo"] - before
        rows.append((label, _us_per_call(seconds, fresh), f"{fresh} distinct tokens, {calls} userinfo calls"))

    opaque_validator = _VALIDATORS["opaque"]
    tokens = [provider.opaque_token(f"user{n}@egi.eu") for n in range(fresh)]
    await opaque_validator.authenticate([f"Bearer {provider.opaque_token('warm@egi.eu')}"])
    before = provider.calls["introspect"]
    seconds = await _time_each([_auth(opaque_validator, t) for t in tokens])
    calls = provider.calls["introspect"] - before
    rows.append(
        ("uncached opaque + introspection", _us_per_call(seconds, fresh), f"{fresh} tokens, {calls} introspections")
    )

    garbage = f"{secrets.token_urlsafe(20)}.{secrets.token_urlsafe(200)}.{secrets.token_urlsafe(40)}"
    seconds = await _time_each([_auth(validator, garbage, expect_error=True) for _ in range(fresh)])
    rows.append(("refused before any I/O (malformed)", _us_per_call(seconds, fresh), f"{fresh} requests"))
    return rows


_VALIDATORS: dict[str, TokenValidator] = {}


def _auth(validator: TokenValidator, token: str, *, expect_error: bool = False) -> Callable[[], Awaitable[object]]:
    async def one() -> object:
        try:
            return await validator.authenticate([f"Bearer {token}"])
        except Exception:
            if not expect_error:
                raise
            return None

    return one


async def concurrency(
    provider: Provider, make: Callable[[], TokenValidator], make_flooded: Callable[[], TokenValidator]
) -> list[tuple[str, str]]:
    """(scenario, provider calls) with a provider answering after 50 ms."""
    rows: list[tuple[str, str]] = []
    provider.delay = 0.05

    validator = make()
    await validator.authenticate([f"Bearer {provider.token()}"])
    provider.calls.clear()
    header = [f"Bearer {provider.token()}"]
    await asyncio.gather(*(validator.authenticate(header) for _ in range(200)))
    rows.append(("200 concurrent first requests, one new token", f"{provider.calls['userinfo']} userinfo call(s)"))

    provider.calls.clear()
    headers = [[f"Bearer {provider.token()}"] for _ in range(50)]
    await asyncio.gather(*(validator.authenticate(h) for h in headers for _ in range(20)))
    rows.append(("50 new tokens x 20 concurrent requests each", f"{provider.calls['userinfo']} userinfo call(s)"))

    provider.calls.clear()
    await asyncio.gather(*(validator.authenticate(h) for h in headers for _ in range(20)))
    rows.append(("the same 1,000 requests again (cached)", f"{sum(provider.calls.values())} provider call(s)"))

    provider.calls.clear()
    opaque = provider.opaque_token("alice@egi.eu")
    await asyncio.gather(*(validator.authenticate([f"Bearer {opaque}"]) for _ in range(200)))
    calls = provider.calls
    rows.append(
        ("200 concurrent, one new opaque token", f"{calls['introspect']} introspection, {calls['userinfo']} userinfo")
    )

    await validator.aclose()

    flooded = make_flooded()
    await flooded.authenticate([f"Bearer {provider.token()}"])
    await asyncio.sleep(1.1)  # past the 1 s refetch interval: the flood may cause one fetch
    provider.calls.clear()
    forged = [_random_kid_token() for _ in range(1000)]
    started = time.monotonic()
    results = await asyncio.gather(*(flooded.authenticate([f"Bearer {t}"]) for t in forged), return_exceptions=True)
    elapsed = time.monotonic() - started
    refused = sum(1 for r in results if getattr(r, "reason", None) == "unknown_key")
    rows.append(
        (
            "1,000 concurrent tokens with random kids",
            f"{provider.calls['certs']} key-set fetch(es) in {elapsed:.2f} s (interval 1 s); "
            f"{refused} refused unknown_key",
        )
    )
    provider.delay = 0.0
    await flooded.aclose()
    return rows


def _random_kid_token() -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": secrets.token_hex(8)}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "sub": "mallory", "exp": int(time.time()) + 600}).encode())
    return f"{header}.{payload}.{b64(secrets.token_bytes(256))}"


async def memory(provider: Provider, validator: TokenValidator, entries: int) -> float:
    """Bytes held per cached Check-in token (principal + userinfo answer + cache bookkeeping)."""
    tokens = [provider.token(sub=f"user{n}@egi.eu") for n in range(entries)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for token in tokens:
        await validator.authenticate([f"Bearer {token}"])
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / entries


async def main(quick: bool) -> None:
    provider = Provider()
    with TemporaryDirectory() as scratch:
        secret = Path(scratch) / "secret"
        secret.write_text("bench-secret\n")
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handle)) as http:

            def make(oidc: dict[str, Any] | None = None, **issuer: Any) -> TokenValidator:
                return build_validator(settings(secret, oidc, **issuer), http)

            checkin = make()
            _VALIDATORS.update(
                token=make(entitlements_source="token", subject_source="token", subject_claim="sub"),
                userinfo=make(),
                opaque=make(accept_opaque_tokens=True, entitlements_source="introspection"),
            )
            rows = await cost(provider, checkin, quick)
            print("token handling, the proxy's own cost per request (in-process provider answers at once)")
            for what, micros, note in rows:
                print(f"  {what:<40} {micros:>9.1f} µs   ({note})")
            print("\nprovider calls under concurrency (provider answers after 50 ms)")
            scenarios = await concurrency(
                provider, lambda: make(accept_opaque_tokens=True), lambda: make({"jwks_min_refetch_seconds": 1})
            )
            for scenario, calls in scenarios:
                print(f"  {scenario:<52} {calls}")
            entries = 2_000 if quick else 10_000
            per_entry = await memory(provider, make(), entries)
            print(f"\nmemory: {per_entry / 1024:.1f} KiB per cached Check-in token ({entries} cached)")
            for validator in (checkin, *_VALIDATORS.values()):
                await validator.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke run)")
    asyncio.run(main(parser.parse_args().quick))
