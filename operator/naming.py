"""Names, labels, ports and owner references every child of an EPDDeployment shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epd.stages import STAGES

from .crd import GROUP, KIND, VERSION

GRPC_PORT = 50051
METRICS_PORT = 9090  # workers' /metrics
HEALTH_PORT = 50052  # workers' plaintext gRPC health, for the kubelet's probes
KV_TCP_PORT = 50053  # decode workers' tcp KV path (prefill writes KV there)
REDIS_PORT = 6379
STAGE_LABEL = f"{GROUP}/stage"
MANAGED_BY = "epd-operator"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
OPERATOR_SELECTOR = {"app.kubernetes.io/name": "epd-serve", COMPONENT_LABEL: "operator"}  # the chart's pods


@dataclass(frozen=True, slots=True)
class Owner:
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        # No blockOwnerDeletion: it would need `update` on epddeployments/finalizers, and nothing has to
        # wait for the children when the owner goes.
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True}


def labels(owner: Owner, component: str) -> dict[str, str]:
    base = {"app.kubernetes.io/name": "epd-serve", INSTANCE_LABEL: owner.name,
            COMPONENT_LABEL: component, "app.kubernetes.io/managed-by": MANAGED_BY}
    if component in STAGES:
        base[STAGE_LABEL] = component
    return base


def owned_selector(owner: Owner) -> str:
    """Label selector of everything the operator made for this owner (what prune lists)."""
    return f"{INSTANCE_LABEL}={owner.name},app.kubernetes.io/managed-by={MANAGED_BY}"


def selector(owner: Owner, component: str) -> dict[str, str]:
    return {INSTANCE_LABEL: owner.name, COMPONENT_LABEL: component}


def selector_string(owner: Owner, component: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(owner, component).items())


def meta(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner.reference()]}


def child_name(owner: Owner, component: str) -> str:
    return f"{owner.name}-{component}"
