"""Names of shared state that hold no token, no secret and no subject in clear.

Redis keys (rate-limit buckets, cached answers) and ALISE's last-known rows are named by
HMAC-SHA256 over the parts that identify them, each part length-prefixed so that no two lists of
parts give the same input. The HMAC key is ``state.hash_key_file``; without it a fixed public key is
used, which makes the name a plain SHA-256: fine for high-entropy subjects (EGI Check-in's are 64
hex digits), but a guessable subject (a user name) could then be confirmed by whoever reads Redis.
Every replica must use the same key, or they do not share state.
"""

from __future__ import annotations

import hashlib
import hmac

PUBLIC_KEY = b"slurmproxy state v1"


class Namer:
    """``name(kind, *parts)`` → ``<prefix><kind>:<64 hex digits>``."""

    def __init__(self, key: bytes, prefix: str = "") -> None:
        self._key = key
        self.prefix = prefix

    def digest(self, *parts: str | bytes) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            mac.update(len(data).to_bytes(4, "big"))
            mac.update(data)
        return mac.hexdigest()

    def name(self, kind: str, *parts: str | bytes) -> str:
        return f"{self.prefix}{kind}:{self.digest(*parts)}"
