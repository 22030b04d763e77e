"""The Helm chart: it lints and renders with every option on, refuses unknown
values, and its PodMonitor / ServiceMonitor are valid Prometheus Operator
objects (checked by a real apiserver holding that project's CRDs)."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import CHART
from .thirdparty import MONITORING, install

pytestmark = pytest.mark.controlplane
EVERY_OPTION = ["--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.serviceMonitor.enabled=true",
                "--set", "monitoring.podMonitor.labels.release=prometheus", "--set", "grafana.dashboard.enabled=true",
                "--set", "operator.prometheus.url=http://prometheus.monitoring:9090",
                "--set", "operator.prometheus.bearerTokenSecret=prometheus-token",
                "--set", "networkPolicy.metricsNamespaces={monitoring}", "--set", "operator.watchNamespaces={ml,ops}"]


def render(k8s_cluster, *values: str) -> list[dict]:
    out = k8s_cluster.helm("template", "epd", str(CHART), "--namespace", "epd-system", *values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def test_chart_lints_and_renders_with_defaults_and_with_every_option(k8s_cluster):
    assert k8s_cluster.helm("lint", str(CHART)).returncode == 0
    assert k8s_cluster.helm("lint", str(CHART), *EVERY_OPTION).returncode == 0
    assert sorted(by_kind(render(k8s_cluster))) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role",
                                                     "RoleBinding", "ServiceAccount"]
    docs = by_kind(render(k8s_cluster, *EVERY_OPTION))
    assert sorted(docs) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "PodMonitor", "Role",
                            "RoleBinding", "Service", "ServiceAccount", "ServiceMonitor"]
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"--prometheus-url=http://prometheus.monitoring:9090", "--prometheus-token-file=/var/run/epd/prometheus/token",
            "--metrics-namespace=monitoring", "--namespace=ml", "--namespace=ops"} <= set(container["command"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    dashboard = json.loads(docs["ConfigMap"]["data"]["epd-serve.json"])
    assert dashboard["uid"] == "epd-serve" and docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert docs["PodMonitor"]["spec"]["namespaceSelector"] == {"matchNames": ["ml", "ops"]}


def test_unknown_or_malformed_values_fail_at_install(k8s_cluster):
    for values, word in ((["--set", "operatr.replicas=2"], "operatr"),
                         (["--set", "monitoring.podMonitor.enabeld=true"], "enabeld"),
                         (["--set", "monitoring.podMonitor.interval=often"], "interval"),
                         (["--set", "operator.prometheus.url=prometheus:9090"], "url")):
        result = k8s_cluster.helm("template", "x", str(CHART), *values, check=False)
        assert result.returncode != 0 and word in result.stderr, (values, result.stderr)


def test_monitors_validate_against_the_prometheus_operator_crds(k8s_cluster, namespace):
    install(k8s_cluster, MONITORING)
    docs = by_kind(render(k8s_cluster, *EVERY_OPTION, "--namespace", namespace))
    for kind in ("PodMonitor", "ServiceMonitor"):
        obj = docs[kind]
        obj["metadata"]["namespace"] = namespace
        result = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                     input=yaml.safe_dump(obj))
        assert f"{kind.lower()}.monitoring.coreos.com/" in result.stdout, result
    broken = docs["PodMonitor"]
    broken["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rewrite"  # not an action
    refused = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                  input=yaml.safe_dump(broken), check=False)
    assert refused.returncode != 0 and "action" in refused.stderr  # the CRDs really validate
