from __future__ import annotations

from typing import Any

import pytest

from slurmproxy.errors import AuthenticationError
from slurmproxy.tokens.checks import (
    check_bearer,
    check_introspected_type,
    check_jwt_type,
    check_time_claims,
    entitlements_from,
    subject_from,
)

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("claims", "require_exp", "reason"),
    [
        pytest.param({"exp": NOW + 60}, True, None, id="valid"),
        pytest.param({}, True, "missing_exp", id="no-exp-required"),
        pytest.param({}, False, None, id="no-exp-optional"),
        pytest.param({"exp": "soon"}, False, "missing_exp", id="exp-not-a-number"),
        pytest.param({"exp": NOW - 31}, False, "token_expired", id="expired-beyond-leeway"),
        pytest.param({"exp": NOW - 29}, True, None, id="expired-within-leeway"),
        pytest.param({"exp": NOW + 60, "nbf": NOW + 31}, True, "token_not_yet_valid", id="nbf"),
        pytest.param({"exp": NOW + 60, "iat": NOW + 31}, True, "token_issued_in_future", id="iat"),
    ],
)
def test_time_claims(claims: dict[str, Any], require_exp: bool, reason: str | None) -> None:
    if reason is None:
        check_time_claims(claims, NOW, 30, require_exp=require_exp)
        return
    with pytest.raises(AuthenticationError) as err:
        check_time_claims(claims, NOW, 30, require_exp=require_exp)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("answer", "token_types", "ok"),
    [
        pytest.param({"token_type": "Bearer"}, (), True, id="rfc7662-bearer"),
        pytest.param({"token_type": "access_token"}, (), True, id="access-token"),
        pytest.param({"token_type": "refresh_token"}, (), False, id="refresh-token"),
        pytest.param({"typ": "Bearer"}, (), True, id="keycloak-typ"),
        pytest.param({"typ": "Refresh"}, (), False, id="keycloak-refresh"),
        pytest.param({"typ": "Offline"}, ("Bearer",), False, id="keycloak-offline"),
        pytest.param({}, (), False, id="says-nothing"),  # oidc-provider's refresh tokens
        pytest.param({"token_type": "Bearer", "typ": "Refresh"}, (), True, id="rfc-field-wins"),
    ],
)
def test_introspected_token_must_be_an_access_token(
    answer: dict[str, Any], token_types: tuple[str, ...], ok: bool
) -> None:
    if ok:
        check_introspected_type(answer, token_types)
        return
    with pytest.raises(AuthenticationError) as err:
        check_introspected_type(answer, token_types)
    assert err.value.reason == "wrong_token_type"


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        pytest.param({"typ": "Bearer"}, True, id="access-token"),
        pytest.param({"typ": "ID"}, False, id="id-token"),
        pytest.param({"typ": "Refresh"}, False, id="refresh-token"),
        pytest.param({}, False, id="no-typ"),
    ],
)
def test_jwt_typ_claim(claims: dict[str, Any], ok: bool) -> None:
    check_jwt_type(claims, ())  # no check configured: anything goes
    if ok:
        check_jwt_type(claims, ("Bearer",))
    else:
        with pytest.raises(AuthenticationError):
            check_jwt_type(claims, ("Bearer",))


def test_sender_constrained_tokens_are_refused() -> None:
    check_bearer({"sub": "a"})
    with pytest.raises(AuthenticationError) as err:
        check_bearer({"sub": "a", "cnf": {"jkt": "x"}})
    assert err.value.reason == "wrong_token_type"


@pytest.mark.parametrize(
    ("claims", "subject"),
    [
        pytest.param({"voperson_id": "v@egi.eu", "sub": "s"}, "v@egi.eu", id="first-claim"),
        pytest.param({"sub": "s"}, "s", id="fallback"),
        pytest.param({"voperson_id": "", "sub": "s"}, "s", id="empty-is-absent"),
        pytest.param({"voperson_id": ["v"], "sub": "s"}, "s", id="non-string-is-absent"),
        pytest.param({}, None, id="none"),
    ],
)
def test_subject_is_the_first_present_claim(claims: dict[str, Any], subject: str | None) -> None:
    if subject is not None:
        assert subject_from(claims, ("voperson_id", "sub"), "userinfo") == subject
        return
    with pytest.raises(AuthenticationError) as err:
        subject_from(claims, ("voperson_id", "sub"), "userinfo")
    assert err.value.reason == "missing_subject"
    assert "userinfo answer has no voperson_id or sub" in err.value.detail


def test_entitlements_from_several_claims_deduplicated() -> None:
    claims = {"eduperson_entitlement": ["a", "b", 3], "entitlements": "a", "other": ["c"]}
    assert entitlements_from(claims, ("eduperson_entitlement", "entitlements")) == ("a", "b")
