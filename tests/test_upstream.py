from __future__ import annotations

import itertools

import pytest

from slurmproxy.upstream import client_headers, response_headers


def _spellings(name: str) -> list[bytes]:
    parts = name.split("-")
    out = set()
    for seps in itertools.product("-_", repeat=len(parts) - 1):
        joined = parts[0] + "".join(s + p for s, p in zip(seps, parts[1:], strict=True))
        for variant in (joined, joined.lower(), joined.upper(), joined.title()):
            out.add(variant.encode())
    return sorted(out)


@pytest.mark.parametrize("name", _spellings("X-SLURM-USER-NAME") + _spellings("X-SLURM-USER-TOKEN"))
def test_client_slurm_headers_are_stripped_in_every_spelling(name: bytes) -> None:
    kept = client_headers([(name, b"root"), (b"accept", b"application/json")])
    assert kept == [(b"accept", b"application/json")]


@pytest.mark.parametrize(
    "name",
    [
        b"authorization",
        b"Authorization",
        b"AUTHORIZATION",
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"x-slurm-anything",
        b"expect",
    ],
)
def test_credentials_and_hop_by_hop_headers_are_dropped(name: bytes) -> None:
    assert client_headers([(name, b"v")]) == []


def test_headers_named_in_connection_are_dropped() -> None:
    headers = [(b"connection", b"close, X-Secret"), (b"x-secret", b"1"), (b"accept", b"*/*")]
    assert client_headers(headers) == [(b"accept", b"*/*")]


def test_ordinary_headers_pass() -> None:
    headers = [(b"accept", b"application/json"), (b"content-type", b"application/json"), (b"user-agent", b"x")]
    assert client_headers(headers) == headers


def test_response_hop_by_hop_dropped_length_kept() -> None:
    headers = [(b"Connection", b"keep-alive"), (b"Content-Length", b"2"), (b"Content-Type", b"application/json")]
    assert response_headers(headers) == [(b"Content-Length", b"2"), (b"Content-Type", b"application/json")]
