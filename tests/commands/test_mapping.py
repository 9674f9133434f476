"""``slurmproxy mapping show`` and ``slurmproxy mapping leases``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slurmproxy.cli import EXIT_CONFIG, main
from slurmproxy.core.durations import parse_duration
from slurmproxy.identity.backends import open_lease_store
from tests.helpers import ISSUER, basic_policy, make_settings


def configure(tmp_path: Path) -> str:
    policy = basic_policy(mapping=[{"table": "users"}, {"pool": "vo"}])
    settings = make_settings(
        tmp_path,
        policy,
        identity={"pools": {"vo": {"accounts": ["pool001..pool003"]}}, "pool_database": str(tmp_path / "l.sqlite")},
    )
    store = open_lease_store(settings.identity)
    assert store is not None
    store.lease("vo", ISSUER, "bob@example.org")
    store.lease("vo", ISSUER, "carol@example.org")
    store.close()
    return str(tmp_path / "config.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_leases_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path)
    status, out, _ = run(capsys, "mapping", "leases", "--config", config)
    assert status == 0
    assert "pool001" in out and "bob@example.org" in out and "pool vo: 2 of 3 leased" in out
    status, out, _ = run(capsys, "mapping", "leases", "list", "--config", config, "--json")
    assert [(d["account"], d["subject"]) for d in json.loads(out)] == [
        ("pool001", "bob@example.org"),
        ("pool002", "carol@example.org"),
    ]


def test_release_by_account_is_audited(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path)
    status, out, err = run(capsys, "mapping", "leases", "--config", config, "release", "--account", "pool001")
    assert status == 0, err
    assert "1 lease(s) released" in out
    (record,) = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert record["method"] == "ADMIN" and record["reason"] == "lease_released"
    assert (record["issuer"], record["subject"], record["local_user"]) == (ISSUER, "bob@example.org", "pool001")
    assert record["mapping_detail"]["lease"] == "released"
    _, out, _ = run(capsys, "mapping", "leases", "--config", config, "--json")
    assert [d["account"] for d in json.loads(out)] == ["pool002"]


def test_release_by_identity_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path)
    args = ["mapping", "leases", "release", "--config", config]
    assert run(capsys, *args)[0] == EXIT_CONFIG
    assert run(capsys, *args, "--issuer", ISSUER)[0] == EXIT_CONFIG
    assert run(capsys, *args, "--pool", "nope", "--all")[0] == EXIT_CONFIG
    status, out, _ = run(capsys, *args, "--issuer", ISSUER, "--subject", "carol@example.org")
    assert status == 0 and "pool002" in out


def test_expire_dry_run_then_for_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path)
    status, out, _ = run(capsys, "mapping", "leases", "expire", "--config", config, "--unused-for", "0", "--dry-run")
    assert status == 0 and "2 lease(s) would be expired" in out
    assert not (tmp_path / "audit.log").exists()
    status, out, _ = run(capsys, "mapping", "leases", "expire", "--config", config, "--unused-for", "30d")
    assert "0 lease(s) expired" in out
    status, out, _ = run(capsys, "mapping", "leases", "expire", "--config", config, "--unused-for", "0s")
    assert "2 lease(s) expired" in out
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 2


def test_show_explains_each_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = configure(tmp_path)
    status, out, _ = run(
        capsys, "mapping", "show", "--config", config, "--issuer", ISSUER, "--subject", "alice@example.org"
    )
    assert status == 0
    assert "rule members" in out
    table_line = next(line for line in out.splitlines() if "table:users" in line)
    assert "alice  <- used" in table_line
    assert "not reached" in next(line for line in out.splitlines() if "pool:vo" in line)
    status, out, _ = run(
        capsys, "mapping", "show", "--config", config, "--issuer", ISSUER, "--subject", "bob@example.org", "--json"
    )
    result: dict[str, Any] = json.loads(out)
    (rule,) = result["rules"]
    assert rule["steps"][1]["answer"] == "pool001" and rule["steps"][1]["detail"]["lease"] == "existing"
    status, out, _ = run(
        capsys, "mapping", "show", "--config", config, "--issuer", ISSUER, "--subject", "new@example.org", "--json"
    )
    assert json.loads(out)["rules"][0]["steps"][1]["detail"] == {"lease": "would lease", "pool": "vo", "free": 1}


def test_leases_without_a_pool_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings(tmp_path)
    status, _, err = run(capsys, "mapping", "leases", "--config", str(tmp_path / "config.yaml"))
    assert status == EXIT_CONFIG and "pool_database" in err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("90", 90, id="plain"),
        pytest.param("90m", 5400, id="minutes"),
        pytest.param("2d", 172800, id="days"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
