"""Every PromQL expression of the chart's Grafana dashboard names only series
the router, the workers, the operator or Prometheus itself (`up`) export, and
selects them with the labels the chart's PodMonitor gives them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import epd.workers.metrics  # noqa: F401  (registers the router's and workers' metrics)
from epd import metric_names
from epd.operator.metrics import REGISTRY as OPERATOR_REGISTRY

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "epd-serve" / "dashboards" / "epd-serve.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def exported() -> set[str]:
    names = {"up"}
    for registry in (REGISTRY, OPERATOR_REGISTRY):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_expression_names_an_exported_metric():
    known = exported()
    named = set()
    for expr in expressions():
        found = SELECTOR.findall(expr) + re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)()", expr)
        assert found, expr
        for metric, _ in found:
            named.add(metric)
            assert metric in known, f"{metric} in {expr!r} is exported by nothing"
    # the panels the issue asks for are there
    for needed in ("epd_request_ttft_seconds_bucket", "epd_request_tpot_seconds_bucket", "epd_operator_slo_seconds",
                   "epd_stage_queue_depth", "epd_stage_busy_seconds_total", "epd_stage_batch_size_bucket",
                   "epd_kv_cache_usage_ratio", "epd_mm_cache_events_total", "epd_prefix_cache_tokens_total",
                   "epd_transfer_bytes_total", "epd_operator_scaling_decisions_total"):
        assert needed in named, needed


def test_the_processes_export_exactly_the_names_of_epd_metric_names():
    exported_metrics = {metric_names.base_name(series) for series in exported() if series.startswith("epd_")}
    assert exported_metrics == metric_names.ALL


def test_selectors_use_the_podmonitor_labels_and_the_operators_own():
    for expr in expressions():
        for metric, labels in SELECTOR.findall(expr):
            if metric.startswith("epd_operator_"):
                assert 'epd_namespace="$namespace"' in labels and 'epd_deployment="$deployment"' in labels, expr
            elif not expr.startswith("label_values"):
                assert 'namespace="$namespace"' in labels and 'epd_deployment="$deployment"' in labels, expr
