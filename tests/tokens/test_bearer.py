from __future__ import annotations

import base64
import json

import pytest

from slurmproxy.errors import AuthenticationError, BadRequestError, MissingTokenError
from slurmproxy.tokens.bearer import extract_bearer, jwt_header, token_digest


@pytest.mark.parametrize(
    ("values", "error", "reason"),
    [
        pytest.param([], MissingTokenError, "missing_token", id="no-header"),
        pytest.param(["Bearer"], MissingTokenError, "missing_token", id="empty-bearer"),
        pytest.param(["Basic dXNlcjpwYXNz"], AuthenticationError, "not_bearer", id="basic"),
        pytest.param(["Bearer a.b.c", "Bearer d.e.f"], BadRequestError, "duplicate_authorization", id="two-headers"),
        pytest.param(["Bearer " + "a" * 20000], AuthenticationError, "token_too_large", id="too-large"),
        pytest.param(["Bearer t\u00f6ken"], AuthenticationError, "malformed_token", id="non-ascii"),
        pytest.param(["Bearer a b"], AuthenticationError, "malformed_token", id="space-inside"),
    ],
)
def test_extract_bearer_refusals(values: list[str], error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as err:
        extract_bearer(values, max_bytes=16384)
    assert getattr(err.value, "reason", None) == reason


def test_bearer_scheme_is_case_insensitive() -> None:
    assert extract_bearer(["bEaReR abc.def.ghi"], max_bytes=100) == "abc.def.ghi"


@pytest.mark.parametrize(
    ("token", "jws"),
    [
        pytest.param(
            base64.urlsafe_b64encode(json.dumps({"alg": "RS256"}).encode()).decode() + ".e30.sig", True, id="jws"
        ),
        pytest.param("bm90LWpzb24.e30.sig", False, id="header-not-json"),
        pytest.param("eyJhbGciOiJSUzI1NiJ9.e30", False, id="two-segments"),
        pytest.param("Zk9xT2JqZWN0LW9wYXF1ZQ", False, id="opaque"),
        pytest.param("WzFd.e30.sig", False, id="header-a-list"),
    ],
)
def test_shape_tells_jws_from_opaque(token: str, jws: bool) -> None:
    assert (jwt_header(token.split(".")) is not None) is jws


def test_digest_is_sha256_hex_and_never_the_token() -> None:
    digest = token_digest("abc.def.ghi")
    assert len(digest) == 64 and "abc" not in digest
    with pytest.raises(AuthenticationError):
        extract_bearer(["Bearer abc\u00e9"], max_bytes=100)
    assert extract_bearer(["Bearer abc\u00e9"], max_bytes=100, check_syntax=False) == "abc\u00e9"
