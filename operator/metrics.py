"""The operator's own Prometheus metrics (its own registry: the operator never
mixes them with the workers'), served on /metrics next to /healthz."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

RECONCILES = Counter("epd_operator_reconciles_total", "Reconciles by result (ok, degraded, retry)", ["result"],
                     registry=REGISTRY)
RECONCILE_SECONDS = Histogram("epd_operator_reconcile_seconds", "Time one reconcile took", registry=REGISTRY,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
APPLY_ERRORS = Counter("epd_operator_apply_errors_total", "Writes the apiserver refused, by reason",
                       ["reason"], registry=REGISTRY)
PRUNED = Counter("epd_operator_pruned_total", "Children deleted because the spec no longer builds them", ["kind"],
                 registry=REGISTRY)
SCALING_DECISIONS = Counter("epd_operator_scaling_decisions_total",
                            "Replica changes chosen by the built-in autoscaler",
                            ["epd_namespace", "epd_deployment", "stage", "direction"], registry=REGISTRY)
# Labels say epd_namespace, not namespace: a scrape of the operator adds its own `namespace`.
SLO_SECONDS = Gauge("epd_operator_slo_seconds", "Each EPDDeployment's latency targets (spec.slo), for dashboards",
                    ["epd_namespace", "epd_deployment", "target"], registry=REGISTRY)
DEPLOYMENTS = Gauge("epd_operator_deployments", "EPDDeployments the operator tracks", registry=REGISTRY)
LEADER = Gauge("epd_operator_leader", "1 while this replica holds the Lease and reconciles", registry=REGISTRY)
