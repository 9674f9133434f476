"""The credential the proxy presents to slurmrestd for a mapped user.

Two modes (``upstream.auth``):

* ``mint``: sign a short-lived HS256 Slurm JWT (``iat``, ``exp``, ``sun``) for the user with the
  cluster's ``jwt_hs256.key`` — the raw bytes of the file are the HMAC key, as in Slurm's
  ``auth_jwt.c``. Tokens are cached per user and re-minted when less than a fifth of their
  lifetime remains.
* ``service_token``: a SlurmUser token read from a file, sent with ``X-SLURM-USER-NAME``; Slurm
  lets SlurmUser act for any user. The file is re-read when it changes, so it can be rotated.

Both send ``X-SLURM-USER-NAME`` (slurmrestd 22.05 requires it with a token). Either secret is
root-equivalent on the cluster: it lives only in memory here, never in a repr, a log or an error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cachetools import TTLCache
from joserfc import jwt
from joserfc.jwk import OctKey

from slurmproxy.config.settings import UpstreamSettings
from slurmproxy.errors import CredentialError

USER_NAME_HEADER = b"x-slurm-user-name"
USER_TOKEN_HEADER = b"x-slurm-user-token"
MIN_KEY_BYTES = 16


def read_secret_file(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if not data:
        raise CredentialError(f"the {what} file {path} is empty")
    return data


class SlurmCredentials(Protocol):
    def headers_for(self, user: str) -> list[tuple[bytes, bytes]]: ...


class MintedTokens:
    def __init__(
        self, key_file: Path, lifetime: int, *, clock: Callable[[], float] = time.time, cache_size: int = 65536
    ) -> None:
        raw = read_secret_file(key_file, "Slurm JWT key")
        if len(raw) < MIN_KEY_BYTES:
            raise CredentialError(f"the Slurm JWT key file {key_file} holds fewer than {MIN_KEY_BYTES} bytes")
        self._key = OctKey.import_key(raw)
        self._lifetime = lifetime
        self._clock = clock
        # Re-mint when less than a fifth of the lifetime is left, so a token never expires in flight.
        self._cache: TTLCache[str, list[tuple[bytes, bytes]]] = TTLCache(
            maxsize=cache_size, ttl=lifetime * 0.8, timer=clock
        )

    def __repr__(self) -> str:
        return f"MintedTokens(lifetime={self._lifetime})"

    def mint(self, user: str) -> str:
        now = int(self._clock())
        claims = {"iat": now, "exp": now + self._lifetime, "sun": user}
        return jwt.encode({"alg": "HS256"}, claims, self._key, algorithms=["HS256"])

    def headers_for(self, user: str) -> list[tuple[bytes, bytes]]:
        cached = self._cache.get(user)
        if cached is None:
            cached = [(USER_NAME_HEADER, user.encode()), (USER_TOKEN_HEADER, self.mint(user).encode())]
            self._cache[user] = cached
        return cached


class ServiceToken:
    def __init__(self, token_file: Path, *, recheck_seconds: float = 5.0) -> None:
        self._file = token_file
        self._recheck = recheck_seconds
        self._checked = 0.0
        self._mtime = 0.0
        self._token = b""
        self._reload()

    def __repr__(self) -> str:
        return f"ServiceToken(file={str(self._file)!r})"

    def _reload(self) -> None:
        raw = read_secret_file(self._file, "SlurmUser token").strip()
        if raw.startswith(b"SLURM_JWT="):  # the output of `scontrol token` works as is
            raw = raw[len(b"SLURM_JWT=") :]
        if not raw or any(c < 0x21 or c > 0x7E for c in raw):
            raise CredentialError(f"the SlurmUser token file {self._file} does not hold a token")
        self._token = raw
        self._mtime = os.stat(self._file).st_mtime

    def headers_for(self, user: str) -> list[tuple[bytes, bytes]]:
        now = time.monotonic()
        if now - self._checked >= self._recheck:
            self._checked = now
            try:
                if os.stat(self._file).st_mtime != self._mtime:
                    self._reload()
            except (OSError, CredentialError):
                pass  # keep the token we have; readiness reports the file problem
        return [(USER_NAME_HEADER, user.encode()), (USER_TOKEN_HEADER, self._token)]


def credentials_from(settings: UpstreamSettings) -> SlurmCredentials:
    if settings.auth == "mint":
        assert settings.jwt_key_file is not None
        return MintedTokens(settings.jwt_key_file, settings.jwt_lifetime_seconds)
    assert settings.service_token_file is not None
    return ServiceToken(settings.service_token_file)
