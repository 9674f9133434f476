from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slurmproxy import __version__
from slurmproxy.cli import EXIT_CONFIG, main
from slurmproxy.config.settings import load_settings
from slurmproxy.config.warnings import config_warnings
from slurmproxy.pipeline.runtime import load_runtime_policy
from tests.helpers import OTHER_VO, basic_policy, make_settings


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings(tmp_path)
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_check_config_reports_bad_policy_with_file_and_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings(tmp_path, basic_policy(allow=["nope"]))
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "policy.yaml" in err and "rules[0] (id=members).allow[0]" in err


def test_serve_refuses_bad_config_before_binding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings(tmp_path)
    config = tmp_path / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["upstream"]["jwt_key_file"] = str(tmp_path / "missing.key")
    config.write_text(yaml.safe_dump(data))
    assert main(["serve", "--config", str(config), "--port", "1"]) == EXIT_CONFIG
    assert "missing.key" in capsys.readouterr().err


def test_serve_refuses_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server: {port: nope}\nupstream: {url: 'http://x', jwt_key_file: k}\n")
    assert main(["serve", "--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(config) in err and "server.port" in err


def test_shipped_example_config_and_policy_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    settings = load_settings(root / "examples" / "config.yaml")
    assert settings.oidc.issuers[0].issuer == "https://aai.egi.eu/auth/realms/egi"
    assert load_runtime_policy(settings).rules


def test_shipped_examples_have_no_warnings() -> None:
    """What the project ships is what admins copy: it must pass its own checks without a warning."""
    root = Path(__file__).resolve().parent.parent
    settings = load_settings(root / "examples" / "config.yaml")
    assert load_runtime_policy(settings).warnings == ()
    assert config_warnings(settings) == []


def test_check_config_prints_the_policy_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = basic_policy()["rules"][0] | {
        "id": "open-vo",
        "entitlements": [OTHER_VO],
        "mapping": [{"service_account": "svc-alpha"}],
    }
    policy = basic_policy(job={"accounts": ["a"]})
    policy["rules"].append(other | {"job": {"accounts": ["b"]}})
    make_settings(tmp_path, policy)
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "warning: local account svc-alpha is reachable from rules of different VOs" in out
    assert "VO vo.example.org: members" in out and "VO vo.other.org: open-vo" in out


def test_check_config_refuses_unconfigured_backends_and_unreadable_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_settings(tmp_path, basic_policy(mapping=[{"alise": "egi"}, {"pool": "vo"}]))
    config = str(tmp_path / "config.yaml")
    assert main(["check-config", "--config", config]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "alise 'egi' is not configured under identity.alise" in err and "pool 'vo' is not configured" in err
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    data["identity"]["alise"] = {"egi": {"url": "https://alise.test", "site": "s", "apikey_file": "missing.key"}}
    data["identity"]["pools"] = {"vo": {"accounts": ["pool001..pool002"]}}
    data["identity"]["pool_database"] = str(tmp_path / "leases.sqlite")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert main(["check-config", "--config", config]) == EXIT_CONFIG
    assert "cannot read apikey_file" in capsys.readouterr().err
    (tmp_path / "missing.key").write_text("k3y\n")
    assert main(["check-config", "--config", config]) == 0


def test_check_config_reads_the_introspection_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    issuer = {"preset": "egi-checkin", "client_id": "proxy", "client_secret_file": "checkin.secret"}
    make_settings(tmp_path, oidc={"issuers": [issuer]})
    config = str(tmp_path / "config.yaml")
    assert main(["check-config", "--config", config]) == EXIT_CONFIG
    assert "checkin.secret: cannot read the client secret" in capsys.readouterr().err
    (tmp_path / "checkin.secret").write_text("not-so-secret\n")
    assert main(["check-config", "--config", config]) == 0
    assert "not-so-secret" not in capsys.readouterr().out
