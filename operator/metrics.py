"""The operator's own Prometheus metrics (its own registry: the operator never
mixes them with the workers'), served on /metrics next to /healthz."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epd import metric_names as names

REGISTRY = CollectorRegistry()

RECONCILES = Counter(names.OPERATOR_RECONCILES, "Reconciles by result (ok, degraded, retry)", ["result"],
                     registry=REGISTRY)
RECONCILE_SECONDS = Histogram(names.OPERATOR_RECONCILE_SECONDS, "Time one reconcile took", registry=REGISTRY,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
APPLY_ERRORS = Counter(names.OPERATOR_APPLY_ERRORS, "Writes the apiserver refused, by reason",
                       ["reason"], registry=REGISTRY)
PRUNED = Counter(names.OPERATOR_PRUNED, "Children deleted because the spec no longer builds them", ["kind"],
                 registry=REGISTRY)
SCALING_DECISIONS = Counter(names.OPERATOR_SCALING_DECISIONS,
                            "Replica changes chosen by the built-in autoscaler",
                            ["epd_namespace", names.DEPLOYMENT_LABEL, "stage", "direction"], registry=REGISTRY)
# Labels say epd_namespace, not namespace: a scrape of the operator adds its own `namespace`.
SLO_SECONDS = Gauge(names.OPERATOR_SLO_SECONDS, "Each EPDDeployment's latency targets (spec.slo), for dashboards",
                    ["epd_namespace", names.DEPLOYMENT_LABEL, "target"], registry=REGISTRY)
DEPLOYMENTS = Gauge(names.OPERATOR_DEPLOYMENTS, "EPDDeployments the operator tracks", registry=REGISTRY)
LEADER = Gauge(names.OPERATOR_LEADER, "1 while this replica holds the Lease and reconciles", registry=REGISTRY)
