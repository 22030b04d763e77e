"""NetworkPolicies of one EPDDeployment (ingress only: what may reach each pod).

gRPC callers, per stage: the router calls every stage; encode pushes embeddings
to prefill; prefill pulls embeddings from (and asks recomputes of) encode and
streams KV to decode, over gRPC or decode's tcp KV port. Everyone else is
refused. /metrics is open to the
operator's pods and to the scraper namespaces the operator was told about;
the router's HTTP port is the one public door; Redis takes only this
deployment's router and workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .naming import (
    GRPC_PORT,
    INSTANCE_LABEL,
    KV_TCP_PORT,
    MANAGED_BY,
    METRICS_PORT,
    OPERATOR_SELECTOR,
    REDIS_PORT,
    Owner,
    child_name,
    meta,
    selector,
)

CALLERS = {"encode": ("router", "prefill"), "prefill": ("router", "encode"), "decode": ("router", "prefill")}
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set on every namespace by the apiserver


@dataclass(frozen=True)
class MetricsReaders:
    operator_namespace: str
    scraper_namespaces: tuple[str, ...] = ()

    def peers(self) -> list[dict[str, Any]]:
        peers = [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: self.operator_namespace}},
                  "podSelector": {"matchLabels": OPERATOR_SELECTOR}}]
        return peers + [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: ns}}}
                        for ns in self.scraper_namespaces]


def _policy(owner: Owner, component: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(owner, child_name(owner, component), component),
            "spec": {"podSelector": {"matchLabels": selector(owner, component)}, "policyTypes": ["Ingress"],
                     "ingress": rules}}


def _pods(owner: Owner, component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": selector(owner, component)}}


def stage_policy(owner: Owner, stage: str, readers: MetricsReaders) -> dict[str, Any]:
    kv_writers = [{"from": [_pods(owner, "prefill")], "ports": [{"port": KV_TCP_PORT}]}] if stage == "decode" else []
    return _policy(owner, stage, [
        {"from": [_pods(owner, caller) for caller in CALLERS[stage]], "ports": [{"port": GRPC_PORT}]},
        *kv_writers,
        {"from": readers.peers(), "ports": [{"port": METRICS_PORT}]}])


def router_policy(owner: Owner, http_port: int, metrics_port: int, readers: MetricsReaders) -> dict[str, Any]:
    return _policy(owner, "router", [{"ports": [{"port": http_port}]},  # no `from`: the public endpoint
                                     {"from": readers.peers(), "ports": [{"port": metrics_port}]}])


def redis_policy(owner: Owner) -> dict[str, Any]:
    deployment = {"podSelector": {"matchLabels": {INSTANCE_LABEL: owner.name, "app.kubernetes.io/managed-by": MANAGED_BY}}}
    return _policy(owner, "redis", [{"from": [deployment], "ports": [{"port": REDIS_PORT}]}])
