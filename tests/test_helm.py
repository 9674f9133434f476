"""The Helm chart, rendered by a real Helm engine (helm-python-sdk embeds Helm 4's Go SDK) and every
manifest validated against the Kubernetes API schemas (kubernetes-validate), all offline."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from slurmproxy.commands.serve import validate as validate_proxy_config

CHART = Path(__file__).resolve().parent.parent / "helm" / "slurmproxy"
FULL = yaml.safe_load((CHART / "ci" / "full-values.yaml").read_text())
KUBERNETES = ["1.25", kubernetes_validate.latest_version()]  # the chart's kubeVersion floor, and the newest
Manifest = dict[str, Any]
DEFAULT_CONFIG = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
SHARED = {**DEFAULT_CONFIG, "state": {"backend": "shared", "redis": {"url": "redis://redis:6379/0"}}}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[Manifest]:
    rendered = chart.render(values or {}, name="hpc", namespace="slurm", is_install=True)
    docs = [
        doc
        for name, text in sorted(rendered.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return docs


def kinds(docs: list[Manifest]) -> dict[str, Manifest]:
    by_kind: dict[str, Manifest] = {}
    for doc in docs:
        key = doc["kind"] if doc["kind"] != "ConfigMap" else doc["metadata"]["name"]
        assert key not in by_kind, key
        by_kind[key] = doc
    return by_kind


def pod_spec(docs: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = kinds(docs)["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("values", [pytest.param({}, id="defaults"), pytest.param(FULL, id="full-example")])
@pytest.mark.parametrize("version", KUBERNETES)
def test_every_manifest_is_valid_kubernetes(chart: helm.Chart, values: dict[str, Any], version: str) -> None:
    docs = render(chart, values)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    expected = {"Deployment", "Service", "ServiceAccount", "hpc-slurmproxy-config", "hpc-slurmproxy-policies"}
    if values:  # several pods (the autoscaler, with the shared state): a disruption budget too
        expected |= {"HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "hpc-slurmproxy-dashboard"}
        expected |= {"hpc-slurmproxy-alert-rules"}
    assert set(kinds(docs)) == expected


def test_the_chart_lints_without_errors() -> None:
    empty: dict[str, Any] = {}
    for values in [empty, FULL]:
        result = helm.lint(CHART, values)
        assert result["errors"] == [] and all(m["severity"] <= 1 for m in result["messages"]), result


@pytest.mark.parametrize("values", [pytest.param({}, id="defaults"), pytest.param(FULL, id="full-example")])
def test_hardened_pod(chart: helm.Chart, values: dict[str, Any]) -> None:
    spec = pod_spec(render(chart, values))
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["startupProbe"]["httpGet"]["path"] == "/_slurmproxy/live"
    assert container["livenessProbe"]["httpGet"]["path"] == "/_slurmproxy/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/_slurmproxy/ready"
    assert container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/tmp"]["name"] == "tmp"  # the only writable place, besides the audit volume
    assert all(m.get("readOnly") for path, m in mounts.items() if path.startswith("/etc/"))
    assert "subPath" not in json.dumps(container["volumeMounts"])


def test_secrets_are_mounted_files_never_values(chart: helm.Chart) -> None:
    docs = render(chart, FULL)
    spec = pod_spec(docs)
    secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    assert {v["secretName"] for v in secret_volumes.values()} == {
        "slurm-jwt-key",
        "slurmproxy-oidc-client",
        "slurmproxy-alise",
        "slurmproxy-audit-key",
        "slurmproxy-redis",
        "slurmproxy-postgres",
        "slurmproxy-state-key",
    }
    assert all(v["defaultMode"] == 0o440 for v in secret_volumes.values())
    assert not [d for d in docs if d["kind"] == "Secret"]
    config = yaml.safe_load(kinds(docs)["hpc-slurmproxy-config"]["data"]["config.yaml"])
    assert config["upstream"]["jwt_key_file"] == "/etc/slurmproxy/secrets/slurm-jwt-key/jwt_hs256.key"
    assert config["audit"]["pseudonym_key_file"] == "/etc/slurmproxy/secrets/audit-pseudonym-key/key"
    assert config["audit"]["file"] == "/var/log/slurmproxy/audit.log"
    assert config["state"]["redis"] == {
        **FULL["config"]["state"]["redis"],
        "password_file": "/etc/slurmproxy/secrets/redis-password/password",
    }
    assert config["state"]["postgres"]["password_file"] == "/etc/slurmproxy/secrets/postgres-password/password"
    assert config["state"]["hash_key_file"] == "/etc/slurmproxy/secrets/state-hash-key/key"
    assert config["server"] == {
        **FULL["config"]["server"],
        "host": "0.0.0.0",
        "port": 8080,
        "allow_plain_http": True,  # TLS ends at the ingress; without it the proxy refuses 0.0.0.0
    }
    assert config["policy"] == {"paths": ["/etc/slurmproxy/policies"]}


def test_the_rendered_config_and_policies_pass_the_proxys_own_check(
    chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's ConfigMaps, as the pods would see them: `slurmproxy check-config` accepts them."""
    by_kind = kinds(render(chart, FULL))
    config = tmp_path / "config.yaml"
    config.write_text(by_kind["hpc-slurmproxy-config"]["data"]["config.yaml"])
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in by_kind["hpc-slurmproxy-policies"]["data"].items():
        (policies / name).write_text(text)
    (tmp_path / "jwt.key").write_bytes(b"k" * 32)
    (tmp_path / "pseudonym.key").write_bytes(b"p" * 32)
    (tmp_path / "state.key").write_bytes(b"s" * 32)
    (tmp_path / "redis.pw").write_text("redis-password\n")
    (tmp_path / "pg.pw").write_text("pg-password\n")
    monkeypatch.setenv("SLURMPROXY_STATE__HASH_KEY_FILE", str(tmp_path / "state.key"))
    monkeypatch.setenv("SLURMPROXY_STATE__REDIS__PASSWORD_FILE", str(tmp_path / "redis.pw"))
    monkeypatch.setenv("SLURMPROXY_STATE__POSTGRES__PASSWORD_FILE", str(tmp_path / "pg.pw"))
    # The secrets' mount paths do not exist here: point the same settings at stand-ins.
    monkeypatch.setenv("SLURMPROXY_UPSTREAM__JWT_KEY_FILE", str(tmp_path / "jwt.key"))
    monkeypatch.setenv("SLURMPROXY_AUDIT__PSEUDONYM_KEY_FILE", str(tmp_path / "pseudonym.key"))
    monkeypatch.setenv("SLURMPROXY_POLICY__PATHS", json.dumps([str(policies)]))
    settings, _ = validate_proxy_config(config)
    assert settings.server.workers == 2 and settings.audit.sink == "file"
    assert settings.state.backend == "shared" and settings.state.redis is not None
    assert [str(n) for n in settings.server.trusted_proxies] == ["10.0.0.0/8"]


def checksums(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = pod_spec_annotations(render(chart, values))
    return {k: v for k, v in annotations.items() if k.startswith("checksum/")}


def pod_spec_annotations(docs: list[Manifest]) -> dict[str, str]:
    annotations: dict[str, str] = kinds(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    return annotations


def test_config_and_policy_changes_roll_the_pods(chart: helm.Chart) -> None:
    base = checksums(chart, FULL)
    assert set(base) == {"checksum/config", "checksum/policies"}
    policy_change = copy.deepcopy(FULL)
    policy_change["policies"]["files"]["users.yaml"] += "    - {issuer: x, subject: y, user: bob}\n"
    config_change = copy.deepcopy(FULL)
    config_change["config"]["identity"]["min_uid"] = 2000
    assert checksums(chart, policy_change)["checksum/policies"] != base["checksum/policies"]
    assert checksums(chart, policy_change)["checksum/config"] == base["checksum/config"]
    assert checksums(chart, config_change)["checksum/config"] != base["checksum/config"]
    assert checksums(chart, {**FULL, "rolloutOnConfigChange": False}) == {}


def test_existing_policy_configmap_is_mounted_as_a_directory(chart: helm.Chart) -> None:
    docs = render(chart, {"policies": {"existingConfigMap": "site-policies", "files": {}}})
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["policies"]["configMap"] == {"name": "site-policies"}
    assert "hpc-slurmproxy-policies" not in kinds(docs)
    assert "checksum/policies" not in pod_spec_annotations(docs)


def test_metrics_annotations_follow_the_metrics_settings(chart: helm.Chart) -> None:
    on = pod_spec_annotations(render(chart, {"config": {"metrics": {"path": "/internal/metrics"}}}))
    assert on["prometheus.io/scrape"] == "true" and on["prometheus.io/path"] == "/internal/metrics"
    off = render(chart, {"metrics": {"enabled": False}})
    assert "prometheus.io/scrape" not in pod_spec_annotations(off)
    assert yaml.safe_load(kinds(off)["hpc-slurmproxy-config"]["data"]["config.yaml"])["metrics"]["enabled"] is False


def test_network_policy_allows_dns_and_the_configured_peers(chart: helm.Chart) -> None:
    policy = kinds(render(chart, FULL))["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"][0]["from"] == FULL["networkPolicy"]["ingressFrom"]
    assert {(p["port"], p["protocol"]) for p in policy["egress"][0]["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert policy["egress"][1:] == FULL["networkPolicy"]["egress"]


def test_several_replicas_with_the_shared_state(chart: helm.Chart) -> None:
    docs = kinds(render(chart, {"replicaCount": 3, "config": SHARED, "secrets": {"redisPassword": {"name": "r"}}}))
    assert docs["Deployment"]["spec"]["replicas"] == 3
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    config = yaml.safe_load(docs["hpc-slurmproxy-config"]["data"]["config.yaml"])
    assert config["state"]["redis"]["password_file"] == "/etc/slurmproxy/secrets/redis-password/password"
    assert "hash_key_file" not in config["state"]  # only the Secrets named are mounted and pointed at


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"replicaCount": "two"}, "/replicaCount", id="schema-type"),
        pytest.param(
            {"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem", id="writable-root"
        ),
        pytest.param({"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "capabilities", id="keeps-caps"),
        pytest.param({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot", id="root"),
        pytest.param({"secrets": {"slurmJwtKey": {"name": ""}}}, "secrets.slurmJwtKey.name", id="no-slurm-key"),
        pytest.param({"config": {"upstream": {"url": "", "auth": "mint"}}}, "upstream", id="no-upstream"),
        pytest.param({"config": {"policy": {"paths": ["/x"]}}}, "/config/policy", id="policy-paths-are-the-charts"),
        pytest.param({"terminationGracePeriodSeconds": 20}, "terminationGracePeriodSeconds (20)", id="grace"),
        pytest.param(
            {"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2}, "config": SHARED},
            "podDisruptionBudget.minAvailable (2)",
            id="pdb-blocks-drains",
        ),
        pytest.param(
            {"replicaCount": 2}, "replicaCount 2 with config.state.backend embedded: every pod", id="replicas-embedded"
        ),
        pytest.param(
            {"autoscaling": {"enabled": True}},
            "autoscaling.enabled with config.state.backend embedded",
            id="autoscaler-embedded",
        ),
        pytest.param(
            {"replicaCount": 3, "config": {**SHARED, "state": {"backend": "shared"}}},
            "set config.state.redis.url",
            id="shared-without-redis",
        ),
        pytest.param(
            {"policies": {"files": {"../x.yaml": "rules: []"}}}, "invalid propertyName", id="policy-file-name"
        ),
        pytest.param({"unknownKey": True}, "unknownKey", id="typo"),
    ],
)
def test_bad_values_are_refused_with_the_value_named(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chart.render(values, name="hpc", namespace="slurm")


def test_metrics_are_served_on_their_own_port(chart: helm.Chart) -> None:
    """Issue 15, item 9: the Service's port never shows the metrics; Prometheus scrapes the pods' own."""
    docs = render(chart, {})
    config = yaml.safe_load(kinds(docs)["hpc-slurmproxy-config"]["data"]["config.yaml"])
    assert config["metrics"]["port"] == 9090 and config["metrics"]["port"] != config["server"]["port"]
    (container,) = pod_spec(docs)["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "metrics": 9090}
    assert pod_spec_annotations(docs)["prometheus.io/port"] == "9090"
    service_ports = kinds(docs)["Service"]["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["http"]
    custom = render(chart, {"metrics": {"port": 9464}, "networkPolicy": {"enabled": True}})
    assert pod_spec_annotations(custom)["prometheus.io/port"] == "9464"
    ingress = kinds(custom)["NetworkPolicy"]["spec"]["ingress"]
    assert {p["port"] for rule in ingress for p in rule["ports"]} == {"http", "metrics"}
