"""The configuration's warnings: legal, probably unsafe, printed by check-config and logged at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurmproxy.config.warnings import config_warnings
from tests.helpers import make_settings


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        pytest.param("http://slurmrestd.cluster.example:6820", True, id="remote-http"),
        pytest.param("http://10.1.2.3:6820", True, id="remote-ip"),
        pytest.param("http://127.0.0.1:6820", False, id="loopback"),
        pytest.param("http://[::1]:6820", False, id="loopback-v6"),
        pytest.param("http://localhost:6820", False, id="localhost"),
        pytest.param("https://slurmrestd.cluster.example:6820", False, id="https"),
        pytest.param("unix:/run/slurmrestd/slurmrestd.socket", False, id="unix"),
    ],
)
def test_service_token_over_plain_http_is_a_warning(tmp_path: Path, url: str, warned: bool) -> None:
    """Issue 15, item 12: the SlurmUser token is root-equivalent; in clear on a network it is anyone's."""
    token = tmp_path / "slurm.token"
    token.write_text("eyJh.eyJz.c2ln\n")
    settings = make_settings(tmp_path, upstream={"url": url, "auth": "service_token", "service_token_file": str(token)})
    warnings = [w for w in config_warnings(settings) if "service_token" in w]
    assert bool(warnings) is warned
    if warned:
        assert "root-equivalent" in warnings[0] and url in warnings[0]
    minted = make_settings(tmp_path, upstream={"url": url, "auth": "mint"})
    assert not [w for w in config_warnings(minted) if "service_token" in w]


def test_turning_off_the_local_account_check_is_a_warning(tmp_path: Path) -> None:
    assert not [w for w in config_warnings(make_settings(tmp_path)) if "require_local_account" in w]
    settings = make_settings(tmp_path, identity={"require_local_account": False})
    (warning,) = [w for w in config_warnings(settings) if "require_local_account" in w]
    assert "without any uid check" in warning


@pytest.mark.parametrize(
    ("issuer", "warned"),
    [
        pytest.param({"preset": "egi-checkin"}, True, id="checkin-preset-alone"),
        pytest.param({"issuer": "https://idp.test"}, True, id="plain-issuer"),
        pytest.param({"preset": "egi-checkin", "clients": ["slurm-portal"]}, False, id="clients"),
        pytest.param({"issuer": "https://idp.test", "audiences": ["slurmproxy"]}, False, id="audiences"),
    ],
)
def test_an_issuer_accepting_any_audience_and_any_client_is_a_warning(
    tmp_path: Path, issuer: dict[str, object], warned: bool
) -> None:
    """Issue 15, item 6: Check-in access tokens carry no aud; without a client allow-list, a token any
    other relying party holds is accepted here."""
    settings = make_settings(tmp_path, oidc={"issuers": [issuer]})
    warnings = [w for w in config_warnings(settings) if w.startswith("oidc.issuers")]
    assert bool(warnings) is warned
    if warned:
        assert "any audience from any client" in warnings[0] and "replay" in warnings[0]
