"""promtool and systemd-analyze, offline, on files written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import DevstackError
from devstack.checks import promtool_check_rules, unit_exposure, verify_unit

pytestmark = pytest.mark.integration

RULES = """\
groups:
  - name: slurmproxy
    rules:
      - alert: SlurmproxyUpstreamErrors
        expr: sum(rate(slurmproxy_upstream_errors_total[5m])) > 0.1
        for: 10m
        labels: {severity: warning}
        annotations: {summary: slurmrestd answers errors}
"""

UNIT = """\
[Unit]
Description=slurmproxy (test unit)

[Service]
ExecStart=/usr/bin/sleep infinity
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
"""


def test_promtool_checks_rules(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text(RULES)
    assert "SUCCESS: 1 rules found" in promtool_check_rules(good)
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.replace("[5m]", "[5m"))
    with pytest.raises(DevstackError, match="bad.yml"):
        promtool_check_rules(bad)


def test_systemd_verify_and_security_offline(tmp_path: Path) -> None:
    unit = tmp_path / "slurmproxy.service"
    unit.write_text(UNIT)
    assert verify_unit(unit) == []
    typo = tmp_path / "typo.service"
    typo.write_text(UNIT + "ProtectSytem=full\n")
    assert any("Unknown key" in line and "ProtectSytem" in line for line in verify_unit(typo))  # exit 0 all the same
    broken = tmp_path / "broken.service"
    broken.write_text(UNIT.replace("/usr/bin/sleep", "/usr/bin/no-such-binary"))
    with pytest.raises(DevstackError, match="not executable"):
        verify_unit(broken)
    plain = tmp_path / "plain.service"
    plain.write_text("[Service]\nExecStart=/usr/bin/sleep infinity\n")
    assert unit_exposure(unit) < unit_exposure(plain) <= 10
