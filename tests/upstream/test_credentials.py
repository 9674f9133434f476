from __future__ import annotations

import os
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from slurmproxy.config.settings import UpstreamSettings
from slurmproxy.errors import CredentialError
from slurmproxy.upstream.credentials import MintedTokens, ServiceToken, credentials_from

KEY = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_minted_token_has_slurm_claims_and_verifies_with_the_raw_key(tmp_path: Path) -> None:
    key_file = tmp_path / "jwt_hs256.key"
    key_file.write_bytes(KEY)
    clock = Clock()
    headers = dict(MintedTokens(key_file, 300, clock=clock).headers_for("alice"))
    assert headers[b"x-slurm-user-name"] == b"alice"
    token = jwt.decode(headers[b"x-slurm-user-token"].decode(), OctKey.import_key(KEY), algorithms=["HS256"])
    assert token.header["alg"] == "HS256"
    assert token.claims == {"iat": 1_700_000_000, "exp": 1_700_000_300, "sun": "alice"}


def test_minted_tokens_are_cached_then_renewed_before_expiry(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(KEY)
    clock = Clock()
    minted = MintedTokens(key_file, 300, clock=clock)
    first = minted.headers_for("alice")
    assert minted.headers_for("alice") is first
    assert minted.headers_for("bob") != first
    clock.now += 241  # past 80 % of the lifetime
    assert minted.headers_for("alice") != first


def test_key_never_appears_in_repr(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(b"S3cr3tK3yMaterial-0123456789abcdef")
    assert "S3cr3t" not in repr(MintedTokens(key_file, 300))


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), (b"short", "fewer than 16 bytes")])
def test_bad_key_files(tmp_path: Path, content: bytes, message: str) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(content)
    with pytest.raises(CredentialError, match=message):
        MintedTokens(key_file, 300)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="cannot read"):
        MintedTokens(tmp_path / "absent", 300)


def test_service_token_reads_scontrol_output_and_follows_rotation(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("SLURM_JWT=aaa.bbb.ccc\n")
    service = ServiceToken(token_file, recheck_seconds=0)
    assert dict(service.headers_for("bob")) == {b"x-slurm-user-name": b"bob", b"x-slurm-user-token": b"aaa.bbb.ccc"}
    token_file.write_text("ddd.eee.fff")
    os.utime(token_file, (1, 1))
    assert dict(service.headers_for("bob"))[b"x-slurm-user-token"] == b"ddd.eee.fff"
    assert "aaa" not in repr(service) and "ddd" not in repr(service)


def test_service_token_file_with_garbage(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("two words\n")
    with pytest.raises(CredentialError, match="does not hold a token"):
        ServiceToken(token_file)


def test_credentials_from_settings(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(KEY)
    (tmp_path / "t").write_text("a.b.c")
    assert isinstance(
        credentials_from(UpstreamSettings(url="http://x", auth="mint", jwt_key_file=tmp_path / "k")), MintedTokens
    )
    assert isinstance(
        credentials_from(UpstreamSettings(url="http://x", auth="service_token", service_token_file=tmp_path / "t")),
        ServiceToken,
    )
