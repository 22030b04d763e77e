"""Pure builders: an EPDDeployment's spec (and the few facts learned from the
cluster) in, the Kubernetes objects that realise it out (plain dicts, ready for
server-side apply). No cluster calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epd.stages import STAGES

from . import epdstage, network, pods, redis, tls
from .naming import GRPC_PORT, METRICS_PORT, Owner, child_name, meta, selector
from .network import MetricsReaders
from .spec import EPDDeploymentSpec

# Every kind build_children makes (what a reconcile lists to see the children as they are).
CHILD_KINDS = (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"),
               ("policy/v1", "PodDisruptionBudget"), ("networking.k8s.io/v1", "NetworkPolicy"),
               (epdstage.API_VERSION, "EPDStage"), (tls.CERT_MANAGER, "Certificate"), (tls.CERT_MANAGER, "Issuer"))
# Kinds whose objects a spec change can stop building (managed Redis switched off, TLS moved between
# providers, NetworkPolicies turned off): the only kinds prune deletes, and the only `delete` verbs
# the chart grants (a test derives this set from the builders).
PRUNABLE = (("apps/v1", "StatefulSet"), ("v1", "Service"), ("networking.k8s.io/v1", "NetworkPolicy"),
            (tls.CERT_MANAGER, "Certificate"), (tls.CERT_MANAGER, "Issuer"))


@dataclass(frozen=True)
class Facts:
    """What the children depend on beyond the spec, learned at reconcile time."""

    replicas: Mapping[str, int] = field(default_factory=dict)  # per stage, from its EPDStage
    tls_provider: str = "operator"  # "operator" | "cert-manager"; ignored when TLS is off
    metrics_readers: MetricsReaders = field(default_factory=lambda: MetricsReaders("epd-system"))


def stage_service(owner: Owner, stage: str) -> dict[str, Any]:
    """Headless: every worker gets a stable DNS name that cache metadata can point at."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(owner, child_name(owner, stage), stage),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector(owner, stage),
                     "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"},
                               {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]}}


def disruption_budget(owner: Owner, component: str) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(owner, child_name(owner, component), component),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner, component)}}}


def router_service(owner: Owner, spec: EPDDeploymentSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(owner, owner.name, "router"),
            "spec": {"type": spec.router.service_type, "selector": selector(owner, "router"),
                     "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http"}]}}


def config_map(owner: Owner, spec: EPDDeploymentSpec) -> dict[str, Any]:
    data = {"EPD_MODEL": spec.model.name, "EPD_MODEL_REVISION": spec.model.revision, "EPD_DTYPE": spec.model.dtype,
            "EPD_SLO_TTFT_SECONDS": str(spec.slo.ttft_seconds), "EPD_SLO_TPOT_SECONDS": str(spec.slo.tpot_seconds),
            "EPD_SLO_PERCENTILE": str(spec.slo.percentile)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(owner, child_name(owner, "config"), "config"),
            "data": data}


def build_children(owner: Owner, spec: EPDDeploymentSpec, facts: Facts = Facts()) -> list[dict[str, Any]]:
    """Everything one EPDDeployment owns and applies, in apply order (generated Secrets aside:
    they are created once, see `reconcile`)."""
    children = [config_map(owner, spec)]
    if spec.tls.enabled and facts.tls_provider == "cert-manager":
        children += tls.cert_manager_objects(owner, spec)
    if spec.cache.managed_redis:
        children += [redis.service(owner), redis.statefulset(owner)]
    for stage in STAGES:
        replicas = facts.replicas.get(stage, spec.stages[stage].replicas)
        children += [epdstage.scale_object(owner, stage), stage_service(owner, stage),
                     pods.stage_statefulset(owner, spec, stage, replicas), disruption_budget(owner, stage)]
    children += [router_service(owner, spec), pods.router_deployment(owner, spec)]
    if spec.network_policy:
        readers = facts.metrics_readers
        children += [network.stage_policy(owner, stage, readers) for stage in STAGES]
        children.append(network.router_policy(owner, spec.router.port, spec.router.metrics_port, readers))
        if spec.cache.managed_redis:
            children.append(network.redis_policy(owner))
    return children


def endpoint(owner: Owner, spec: EPDDeploymentSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.router.port}/v1"
