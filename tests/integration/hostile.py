"""Tools for the hostile-input tests: raw HTTP over a socket, tokens with chosen headers and claims,
a loopback canary that proves no outbound request was made, and slurmrestd's own request log."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc.jwk import RSAKey

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value

    @property
    def reason(self) -> str | None:
        try:
            return str(self.json()["slurmproxy"]["reason"])
        except (ValueError, KeyError, TypeError):
            return None


def raw_request(server: ProxyServer, data: bytes, timeout: float = 60) -> RawAnswer:
    """Send ``data`` as it is (a real client library would refuse or repair it) and read one answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed without an answer; got {received!r}")
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return RawAnswer(int(lines[0].split()[1]), headers, body)


def http_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Canary:
    """A loopback TCP listener that counts connections: tokens point jku, x5u or iss at it, and
    the test asserts it was never contacted."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class Forger:
    """Tokens for the real provider's issuer, signed with its real key (read from its state
    directory) or with an attacker's key, with any header and claims."""

    oidc: OidcProvider
    attacker: RSAKey = field(
        default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "attacker-1"}, private=True)
    )
    # Small enough to embed in a token header (joserfc refuses headers over 512 bytes outright).
    embeddable: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 1024))  # noqa: S505 - an attacker key

    def embeddable_jwk(self, kid: str) -> dict[str, Any]:
        n = self.embeddable.public_key().public_numbers().n
        return {"kty": "RSA", "kid": kid, "e": "AQAB", "n": b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))}

    @property
    def provider_key(self) -> RSAKey:
        keys = json.loads((self.oidc.state_dir / "keys.json").read_text())["keys"]
        current = self.oidc.current_kid
        jwk = next(k for k in keys if k["kid"] == current)
        return RSAKey.import_key({k: v for k, v in jwk.items() if k != "alg"})  # any RSA alg, to test the allow-list

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.oidc.issuer,
            "sub": "alice",
            "aud": PROXY_AUDIENCE,
            "iat": now,
            "exp": now + 600,
            "eduperson_entitlement": [MEMBER_ENTITLEMENT],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def signed(
        self, header: dict[str, Any] | None = None, *, attacker: bool = False, small: bool = False, **claims: Any
    ) -> str:
        key = self.attacker if attacker else self.provider_key
        hdr: dict[str, Any] = {"alg": "RS256", "typ": "at+jwt", "kid": key.kid}
        hdr.update(header or {})
        signing_input = f"{b64json({k: v for k, v in hdr.items() if v is not None})}.{b64json(self.claims(**claims))}"
        # Signed by hand: a JOSE library validates (and would refuse) the hostile headers tested here.
        digest = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}[hdr["alg"]]
        private = self.embeddable if small else key.private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        return f"{signing_input}.{b64(private.sign(signing_input.encode(), padding.PKCS1v15(), digest))}"

    def unsigned(self, alg: str = "none", **claims: Any) -> str:
        return f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(self.claims(**claims))}."

    def hmac_with_public_key(self, form: str) -> str:
        """HS256 keyed with the issuer's published public key: the classic algorithm confusion."""
        public = self.provider_key
        secret = public.as_pem(private=False) if form == "pem" else json.dumps(public.as_dict(private=False)).encode()
        signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': public.kid})}.{b64json(self.claims())}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(signature)}"


_ROUTED = re.compile(r"operations_router: \[[^\]]*\][^ ]* (\S+) (\S+)")


class RestdLog:
    """What slurmrestd itself received: the ``operations_router`` lines of its log (method, path)."""

    def __init__(self, slurm: SlurmCluster) -> None:
        self.path: Path = slurm.log_dir / "slurmrestd.log"

    def mark(self) -> int:
        return self.path.stat().st_size

    def since(self, mark: int) -> list[tuple[str, str]]:
        with self.path.open("rb") as handle:
            handle.seek(mark)
            text = handle.read().decode("utf-8", "replace")
        return [(m.group(1), m.group(2)) for m in _ROUTED.finditer(text)]


def diag_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)
    }
