from __future__ import annotations

import pytest

from slurmproxy.config.presets import CHECKIN_ISSUERS, PRESETS, legacy_checkin_issuer, with_preset


@pytest.mark.parametrize(
    ("issuer", "legacy"),
    [
        pytest.param("https://aai.egi.eu/oidc/", True, id="production"),
        pytest.param("https://aai.egi.eu/oidc", True, id="no-slash"),
        pytest.param("https://aai-demo.egi.eu/oidc/", True, id="demo"),
        pytest.param("https://AAI-DEV.egi.eu/oidc/", True, id="dev-upper-case"),
        pytest.param("https://aai.egi.eu/auth/realms/egi", False, id="keycloak"),
        pytest.param("https://aai.egi.eu.evil.org/oidc/", False, id="other-host"),
        pytest.param("https://example.org/oidc/", False, id="other-provider"),
    ],
)
def test_legacy_checkin_issuers(issuer: str, legacy: bool) -> None:
    assert legacy_checkin_issuer(issuer) is legacy


def test_presets_are_the_documented_checkin_issuers() -> None:
    assert set(PRESETS) == {"egi-checkin", "egi-checkin-demo", "egi-checkin-dev"}
    assert {p["issuer"] for p in PRESETS.values()} == set(CHECKIN_ISSUERS.values())
    assert not any(legacy_checkin_issuer(p["issuer"]) for p in PRESETS.values())


def test_explicit_keys_win_and_unknown_presets_are_left_for_validation() -> None:
    merged = with_preset({"preset": "egi-checkin-demo", "subject_claim": "sub"})
    assert merged["issuer"] == "https://aai-demo.egi.eu/auth/realms/egi"
    assert merged["subject_claim"] == "sub" and merged["entitlements_source"] == "userinfo"
    assert with_preset({"preset": "nope", "issuer": "https://i"}) == {"preset": "nope", "issuer": "https://i"}
