"""The header policy of forwarding: what of the client's request reaches slurmrestd, and of its answer the client.

Header policy, applied to every request before anything is added:

* hop-by-hop headers (RFC 9110 §7.6.1) and those named in ``Connection`` are dropped;
* ``Authorization`` is always dropped: since Slurm 23.02, slurmrestd would read it as a Slurm token;
* every header whose name, lower-cased with ``_`` read as ``-``, starts with ``x-slurm-`` is
  dropped: slurmrestd trusts ``X-SLURM-USER-NAME``/``X-SLURM-USER-TOKEN`` as given;
* then the proxy's own credential headers for the mapped user are added.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Never forwarded from the client: set by the proxy for the upstream, or a credential.
_CLIENT_DROP = HOP_BY_HOP | {b"host", b"authorization", b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP


def normalized(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if normalized(name) == b"connection":
            tokens.update(normalized(t.strip()) for t in value.split(b","))
    return tokens


def client_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers that may reach slurmrestd (before the proxy adds its own)."""
    headers = list(headers)
    named = _connection_tokens(headers)
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        norm = normalized(name)
        if norm in _CLIENT_DROP or norm in named or norm.startswith(b"x-slurm-"):
            continue
        kept.append((name, value))
    return kept


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    named = _connection_tokens(headers)
    return [(n, v) for n, v in headers if normalized(n) not in _RESPONSE_DROP and normalized(n) not in named]
