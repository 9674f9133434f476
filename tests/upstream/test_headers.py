from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from slurmproxy.upstream.headers import client_headers, response_headers


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


_DANGEROUS = ["x-slurm-user-name", "x-slurm-user-token", "x-slurm-anything", "authorization", "host", "expect"]
_HOP = ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization"]
_ORDINARY = ["accept", "content-type", "user-agent", "x-request-id", "x-slurmproxy-note", "x-slurm", "slurm-user-name"]


@st.composite
def _header_name(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(_DANGEROUS + _HOP + _ORDINARY) | st.from_regex(r"[A-Za-z0-9_\-]{1,20}", fullmatch=True))
    mangled = "".join(
        (c.upper() if draw(st.booleans()) else c.lower())
        if c.isalpha()
        else ("_" if c == "-" and draw(st.booleans()) else c)
        for c in name
    )
    return mangled.encode()


@settings(max_examples=500)
@given(st.lists(st.tuples(_header_name(), st.binary(max_size=20)), max_size=12))
def test_no_spelling_of_a_credential_or_hop_header_ever_passes(headers: list[tuple[bytes, bytes]]) -> None:
    kept = client_headers(headers)
    named = {
        t.strip().lower().replace(b"_", b"-")
        for n, v in headers
        if n.lower().replace(b"_", b"-") == b"connection"
        for t in v.split(b",")
    }
    for name, _ in kept:
        norm = name.lower().replace(b"_", b"-")
        assert not norm.startswith(b"x-slurm-")
        assert norm.decode() not in _DANGEROUS + _HOP and norm not in named
    # Everything else passes unchanged and in order.
    expected = [
        (n, v)
        for n, v in headers
        if not (n.lower().replace(b"_", b"-").startswith(b"x-slurm-"))
        and n.lower().replace(b"_", b"-").decode()
        not in _DANGEROUS + _HOP + ["content-length", "proxy-connection", "proxy-authenticate"]
        and n.lower().replace(b"_", b"-") not in named
    ]
    assert kept == expected
