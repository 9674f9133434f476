"""The Grafana dashboard and the Prometheus alert rules shipped with the chart (helm/slurmproxy/files/).

promtool (Debian's ``prometheus`` package) checks the rules and runs their unit tests, in which every
alert fires on the series that should make it fire. The dashboard must be valid JSON whose queries are
valid PromQL (promtool checks them as recording rules) and name only metrics the proxy exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from devstack.checks import promtool_check_rules, promtool_test_rules
from slurmproxy.observability.metrics import Metrics
from tests.test_helm import CHART, kinds, render

FILES = CHART / "files"
ALERTS = FILES / "alerts.yaml"
DASHBOARD = FILES / "dashboard.json"
# A metric name in PromQL: an identifier not followed by "(" (a function) and not a label or keyword.
_NAME = re.compile(r"\b(slurmproxy_[a-z_]+|process_[a-z_]+|up)\b(?!\s*\()")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def exported_series() -> set[str]:
    """Every series name the proxy's /metrics can show (its registry's families, labelled or not yet)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"${variable['name']}", variable["definition"]))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules_and_their_tests_fire() -> None:
    assert "SUCCESS: 9 rules found" in promtool_check_rules(ALERTS)
    assert "SUCCESS" in promtool_test_rules(FILES / "alerts_test.yaml")


def test_every_alert_has_a_test_that_fires_it() -> None:
    tests = yaml.safe_load((FILES / "alerts_test.yaml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_the_alerts_cover_what_an_operator_must_know() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert 'dependency="provider"' in exprs["SlurmproxyProviderDown"]
    assert "upstream_unreachable" in exprs["SlurmproxySlurmrestdUnavailable"]
    assert 'status=~"5.."' in exprs["SlurmproxySlurmrestdErrors"]
    assert "slurmproxy_audit_write_failures_total" in exprs["SlurmproxyAuditUnavailable"]
    assert "slurmproxy_policy_last_load_success" in exprs["SlurmproxyPolicyReloadFailed"]
    assert 'reason="rate_limited"' in exprs["SlurmproxyRateLimitStorm"]
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"} and rule["annotations"]["summary"]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_name_only_metrics_the_proxy_exports(source: str) -> None:
    exported = exported_series()
    assert "slurmproxy_requests_total" in exported and "slurmproxy_request_duration_seconds_bucket" in exported
    exprs = [e for _, e in dashboard_queries()] if source == "dashboard" else [r["expr"] for r in alert_rules()]
    named = {name for expr in exprs for name in _NAME.findall(expr)} - {"up"}
    assert named and named <= exported, sorted(named - exported)


def test_the_dashboards_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "slurmproxy" and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rules = []
    for n, (title, expr) in enumerate(dashboard_queries()):
        if expr.startswith("label_values("):  # Grafana's own function: check the metric it names only
            continue
        promql = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        assert "$" not in promql, (title, expr)
        rules.append({"record": f"dashboard:query_{n}", "expr": promql})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool_check_rules(path)


def test_the_chart_ships_both_when_asked(tmp_path: Path) -> None:
    with helm.Chart.load(CHART) as chart:
        assert {"hpc-slurmproxy-dashboard", "hpc-slurmproxy-alert-rules"}.isdisjoint(kinds(render(chart)))
        values = {"metrics": {"dashboard": {"enabled": True}, "alertRules": {"enabled": True}}}
        by_name = kinds(render(chart, values))
    dashboard = by_name["hpc-slurmproxy-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["slurmproxy.json"]) == json.loads(DASHBOARD.read_text())
    rules = tmp_path / "alerts.yaml"
    rules.write_text(by_name["hpc-slurmproxy-alert-rules"]["data"]["alerts.yaml"])
    assert yaml.safe_load(rules.read_text()) == yaml.safe_load(ALERTS.read_text())
    assert "SUCCESS: 9 rules found" in promtool_check_rules(rules)
