"""Identity-mapping costs on this machine: pool leases (new and existing, two processes racing) and
ALISE lookups served from the cache. Prints figures; asserts nothing about time.

    .venv/bin/python -m bench.identity_mapping [--identities 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

from slurmproxy.config.settings import AliseSettings
from slurmproxy.identity.alise import AliseClient
from slurmproxy.identity.pool import LeaseStore

ISSUER = "https://aai.egi.eu/auth/realms/egi"


def _lease(path: str, accounts: tuple[str, ...], subjects: list[str]) -> tuple[float, int]:
    store = LeaseStore(Path(path), {"bench": accounts}).open()
    t0 = time.perf_counter()
    taken = [store.lease("bench", ISSUER, s).account for s in subjects]
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed, len(set(taken))


def pools(identities: int) -> None:
    accounts = tuple(f"acct{n:06d}" for n in range(identities))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "leases.sqlite")
        LeaseStore(Path(path), {"bench": accounts}).open().close()
        half = identities // 2
        batches = [[f"p0-{n}" for n in range(half)], [f"p1-{n}" for n in range(identities - half)]]
        t0 = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_lease, [path, path], [accounts, accounts], batches))
        wall = time.perf_counter() - t0
        store = LeaseStore(Path(path), {"bench": accounts}).open()
        distinct = len({lease.account for lease in store.leases()})
        t0 = time.perf_counter()
        for subject in batches[0]:
            store.find("bench", ISSUER, subject)
        find = (time.perf_counter() - t0) / len(batches[0])
        store.close()
    per_lease = max(r[0] for r in results) / max(len(b) for b in batches)
    print(
        f"pool: {identities} new identities, 2 processes racing: {distinct} distinct leases, "
        f"wall {wall:.2f} s (incl. process start), {per_lease * 1e3:.2f} ms per new lease per process"
    )
    print(f"pool: existing lease lookup (find): {find * 1e6:.0f} µs each")


async def alise(lookups: int) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        sub = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, json={"internal": {"username": "jdoe"}, "external": [{"iss": ISSUER, "sub": sub}]})

    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        key.write_text("k")
        settings = AliseSettings(url="http://alise.bench", site="s", apikey_file=key)
        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        client = AliseClient("bench", settings, http, "k")
        t0 = time.perf_counter()
        for n in range(1000):
            await client.lookup(ISSUER, f"user{n}")
        miss = (time.perf_counter() - t0) / 1000
        t0 = time.perf_counter()
        for n in range(lookups):
            await client.lookup(ISSUER, f"user{n % 1000}")
        hit = (time.perf_counter() - t0) / lookups
        await http.aclose()
    print(f"alise: first lookup through the client (in-process transport, no network): {miss * 1e6:.0f} µs")
    print(f"alise: cached lookup: {hit * 1e6:.1f} µs ({lookups} lookups)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identities", type=int, default=2000)
    args = parser.parse_args()
    pools(args.identities)
    asyncio.run(alise(100_000))


if __name__ == "__main__":
    main()
