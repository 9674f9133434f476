from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slurmproxy.config.settings import load_settings
from slurmproxy.errors import ConfigError

BASE = {
    "oidc": {"issuers": [{"issuer": "https://idp.example.org"}]},
    "upstream": {"url": "http://127.0.0.1:6820", "jwt_key_file": "keys/jwt.key"},
}


UP: dict[str, str] = {"url": "http://127.0.0.1:6820", "jwt_key_file": "keys/jwt.key"}


def test_api_version_discovery_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    assert settings.upstream.discovery_user == "nobody"
    assert settings.upstream.api_versions_refresh_seconds == 300
    off = load_settings(write(tmp_path, {**BASE, "upstream": {**UP, "api_versions_refresh_seconds": 0}}))
    assert off.upstream.api_versions_refresh_seconds == 0


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    assert settings.server.port == 8080
    assert settings.upstream.auth == "mint"
    assert settings.upstream.jwt_key_file == tmp_path / "keys/jwt.key"
    assert settings.policy.paths == (tmp_path / "policies",)
    assert settings.oidc.issuers[0].algorithms == ("RS256", "ES256")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMPROXY_SERVER__PORT", "9999")
    monkeypatch.setenv("SLURMPROXY_UPSTREAM__URL", "unix:/run/slurmrestd.sock")
    settings = load_settings(write(tmp_path, BASE))
    assert settings.server.port == 9999
    assert settings.upstream.url == "unix:/run/slurmrestd.sock"
    assert settings.upstream.jwt_key_file == tmp_path / "keys/jwt.key"


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        pytest.param({"server": {"port": 70000}}, "server.port", id="port-range"),
        pytest.param({"server": {"prot": 1}}, "server.prot: Extra inputs", id="typo"),
        pytest.param({"upstream": {"url": "ftp://x"}}, "upstream.url", id="scheme"),
        pytest.param({"upstream": {"url": "http://x", "auth": "mint"}}, "needs jwt_key_file", id="no-key"),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "algorithms": ["HS256"]}]}},
            "oidc.issuers.0.algorithms",
            id="hmac-alg",
        ),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "algorithms": ["none"]}]}}, "not an allowed", id="alg-none"
        ),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i"}, {"issuer": "https://i"}]}}, "configured twice", id="dupe"
        ),
        pytest.param({"oidc": {"issuers": [{"issuer": "idp.example.org"}]}}, "http(s) URL", id="issuer-url"),
        pytest.param({"audit": {"sink": "file"}}, "needs file", id="audit-file"),
        pytest.param({"identity": {"pools": {"vo": {"accounts": ["p1..p2"]}}}}, "need pool_database", id="pool-db"),
        pytest.param(
            {"identity": {"pools": {"a": {"accounts": ["p1..p3"]}, "b": {"accounts": ["p3"]}}, "pool_database": "x"}},
            "account p3 is in pools a and b",
            id="pools-overlap",
        ),
        pytest.param(
            {"identity": {"pools": {"vo": {"accounts": ["p3..p1"]}}, "pool_database": "x"}},
            "identity.pools.vo.accounts",
            id="pool-range",
        ),
        pytest.param(
            {"identity": {"alise": {"egi": {"url": "https://a/?apikey=x", "site": "s", "apikey_file": "k"}}}},
            "identity.alise.egi.url",
            id="alise-url-query",
        ),
        pytest.param(
            {"identity": {"alise": {"egi": {"url": "https://a", "site": "s", "apikey_file": "k", "outage": "open"}}}},
            "identity.alise.egi.outage",
            id="alise-outage-mode",
        ),
        pytest.param({"upstream": {**UP, "discovery_user": "root"}}, "discovery_user must not be", id="discovery-root"),
        pytest.param(
            {"upstream": {**UP, "discovery_user": "slurm"}}, "discovery_user must not be", id="discovery-slurm"
        ),
        pytest.param(
            {"upstream": {**UP, "discovery_user": "svc"}, "identity": {"denied_users": ["svc"]}},
            "discovery_user must not be",
            id="discovery-denied",
        ),
        pytest.param({"upstream": {**UP, "discovery_user": "No Body"}}, "upstream.discovery_user", id="discovery-name"),
        pytest.param({"upstream": {**UP, "api_versions_refresh_seconds": 5}}, "at least 10", id="refresh-too-often"),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://aai.egi.eu/oidc/"}]}}, "retired EGI Check-in", id="legacy-checkin"
        ),
        pytest.param(
            {"oidc": {"issuers": [{"preset": "egi-checkin", "issuer": "https://aai-dev.egi.eu/oidc"}]}},
            "retired EGI Check-in",
            id="legacy-checkin-dev-over-preset",
        ),
        pytest.param({"oidc": {"issuers": [{"preset": "egi-chekin"}]}}, "oidc.issuers.0.preset", id="preset-typo"),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "accept_opaque_tokens": True}]}},
            "needs client_id and client_secret_file",
            id="opaque-without-client",
        ),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "entitlements_source": "introspection", "client_id": "c"}]}},
            "needs client_id and client_secret_file",
            id="introspection-without-secret",
        ),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "entitlements_source": "ldap"}]}},
            "entitlements_source",
            id="unknown-source",
        ),
        pytest.param(
            {
                "oidc": {
                    "issuers": [
                        {
                            "issuer": f"https://{n}",
                            "accept_opaque_tokens": True,
                            "client_id": "c",
                            "client_secret_file": "s",
                        }
                        for n in ("a", "b")
                    ]
                }
            },
            "at most one issuer may accept opaque tokens",
            id="two-opaque-issuers",
        ),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "userinfo_endpoint": "idp/userinfo"}]}},
            "userinfo_endpoint",
            id="endpoint-url",
        ),
        pytest.param(
            {"oidc": {"issuers": [{"issuer": "https://i", "subject_claim": []}]}}, "subject_claim", id="no-sub"
        ),
        pytest.param({"oidc": {"jwks_min_refetch_seconds": 0}}, "jwks_min_refetch_seconds", id="refetch-zero"),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path: Path, patch: dict[str, object], fragment: str) -> None:
    data = {**BASE, **patch}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in err.value.detail
    assert fragment in err.value.detail


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "server: [1"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(write(tmp_path, "- 1\n"))


def test_bad_environment_value_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMPROXY_SERVER__PORT", "not-a-number")
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(write(tmp_path, BASE))


def test_identity_backends_resolve_paths_and_expand_pools(tmp_path: Path) -> None:
    data = {
        **BASE,
        "identity": {
            "alise": {"egi": {"url": "https://alise.example.org/", "site": "hpc", "apikey_file": "alise.key"}},
            "pools": {"vo": {"accounts": ["vo001..vo003", "extra"]}},
            "pool_database": "state/leases.sqlite",
        },
    }
    identity = load_settings(write(tmp_path, data)).identity
    assert identity.alise["egi"].url == "https://alise.example.org"
    assert identity.alise["egi"].apikey_file == tmp_path / "alise.key"
    assert identity.alise["egi"].outage == "fail_closed"
    assert identity.pools["vo"].accounts == ("vo001", "vo002", "vo003", "extra")
    assert identity.pool_database == tmp_path / "state/leases.sqlite"


@pytest.mark.parametrize(
    ("preset", "issuer"),
    [
        pytest.param("egi-checkin", "https://aai.egi.eu/auth/realms/egi", id="production"),
        pytest.param("egi-checkin-demo", "https://aai-demo.egi.eu/auth/realms/egi", id="demo"),
        pytest.param("egi-checkin-dev", "https://aai-dev.egi.eu/auth/realms/egi", id="development"),
    ],
)
def test_checkin_preset_is_one_line(tmp_path: Path, preset: str, issuer: str) -> None:
    path = write(tmp_path, {**BASE, "oidc": {"issuers": [{"preset": preset}]}})
    (checkin,) = load_settings(path).oidc.issuers
    assert checkin.issuer == issuer
    assert checkin.algorithms == ("RS256",)
    assert checkin.entitlements_source == "userinfo"
    assert checkin.subject_claim == ("voperson_id", "sub")
    assert checkin.claim_sources == {"userinfo"}
    assert checkin.token_types == ("Bearer",)
    assert checkin.audiences == ()
    assert not checkin.uses_introspection


def test_settings_next_to_a_preset_override_it(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    entry = {
        "preset": "egi-checkin",
        "subject_claim": "sub",
        "entitlements_source": "introspection",
        "client_id": "slurmproxy",
        "client_secret_file": "secret",
    }
    (checkin,) = load_settings(write(tmp_path, {**BASE, "oidc": {"issuers": [entry]}})).oidc.issuers
    assert checkin.issuer == "https://aai.egi.eu/auth/realms/egi"
    assert checkin.subject_claim == ("sub",)
    assert checkin.subject_source == "userinfo"  # still the preset's
    assert checkin.claim_sources == {"userinfo", "introspection"}
    assert checkin.client_secret_file == tmp_path / "secret"


def test_generic_issuer_defaults_read_only_the_token(tmp_path: Path) -> None:
    (issuer,) = load_settings(write(tmp_path, BASE)).oidc.issuers
    assert issuer.claim_sources == {"token"}
    assert issuer.subject_claim == ("sub",)
    assert not issuer.accept_opaque_tokens and not issuer.uses_introspection
