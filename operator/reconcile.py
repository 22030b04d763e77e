"""One reconcile for create, update, resume, drift timer and child events:
build the children from the spec, apply them, and report status."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace

from .builders import Owner, build_children, child_name, endpoint
from .cluster import Cluster
from .spec import STAGES, EPDDeploymentSpec
from .status import WorkloadState, compute_status

log = logging.getLogger(__name__)


def scaled(spec: EPDDeploymentSpec, status: dict) -> EPDDeploymentSpec:
    """With autoscaling on, each stage runs the replicas the scaler last chose, kept in
    status.stages.<stage>.scaledReplicas (so a restarted operator keeps them) within min..max.
    A choice made from other spec replicas than today's is void: a user's edit wins, and the
    scaler goes on from there."""
    if not spec.autoscaling.enabled:
        return spec
    stages = {}
    for stage, stage_spec in spec.stages.items():
        record = status.get("stages", {}).get(stage, {})
        chosen = record.get("scaledReplicas", stage_spec.replicas) if record.get("scaledFrom") == stage_spec.replicas \
            else stage_spec.replicas
        stages[stage] = replace(stage_spec, replicas=min(max(chosen, stage_spec.min_replicas), stage_spec.max_replicas))
    return replace(spec, stages=stages)


@dataclass
class ReconcileResult:
    changed: list[str] = field(default_factory=list)  # "Kind/name" of children created or corrected
    degraded: str = ""
    message: str = ""


@dataclass
class Reconciler:
    cluster: Cluster
    default_image: str
    # kopf runs sync handlers in a thread pool, and child events of one owner arrive together:
    # reconciles of the same EPDDeployment take turns so each reports exactly what it changed.
    locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))

    def reconcile(self, body: dict, status_patch: dict | None = None) -> ReconcileResult:
        """Reconcile the deployment as it is now (the triggering event's body may be stale: the
        scaler's choice lives in status), after recording `status_patch` under the same lock."""
        meta = body["metadata"]
        with self.locks[meta["uid"]]:
            if status_patch:
                self.cluster.patch_status(meta["name"], meta["namespace"], status_patch)
            current = self.cluster.get_deployment(meta["name"], meta["namespace"])
            if current is None or current["metadata"].get("deletionTimestamp"):
                return ReconcileResult()  # going away: garbage collection removes the children
            return self._reconcile(current)

    def _reconcile(self, body: dict) -> ReconcileResult:
        meta = body["metadata"]
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        spec = scaled(EPDDeploymentSpec.from_resource(body["spec"], self.default_image), body.get("status") or {})
        result = ReconcileResult()
        missing = [name for name in spec.secrets()
                   if self.cluster.get("v1", "Secret", name, owner.namespace) is None]
        if missing:
            result.degraded = "SecretNotFound"
            result.message = f"Secret {', '.join(missing)} not found in namespace {owner.namespace}"
        else:
            for child in build_children(owner, spec):
                name = child["metadata"]["name"]
                before = self.cluster.get(child["apiVersion"], child["kind"], name, owner.namespace)
                applied = self.cluster.apply(child)
                # An apply that changes nothing keeps the resourceVersion, so a new one means we
                # created the child, rolled out a spec change, or reverted drift.
                if before is None or before["metadata"]["resourceVersion"] != applied["metadata"]["resourceVersion"]:
                    result.changed.append(f"{child['kind']}/{name}")
        self.cluster.patch_status(owner.name, owner.namespace, self.status(body, owner, spec, result))
        return result

    def status(self, body: dict, owner: Owner, spec: EPDDeploymentSpec, result: ReconcileResult) -> dict:
        stages = {stage: WorkloadState.of(self.cluster.get("apps/v1", "StatefulSet", child_name(owner, stage),
                                                           owner.namespace), spec.stages[stage].replicas)
                  for stage in STAGES}
        router = WorkloadState.of(self.cluster.get("apps/v1", "Deployment", child_name(owner, "router"),
                                                   owner.namespace), spec.router.replicas)
        return compute_status(body["metadata"].get("generation", 0), stages, router, endpoint(owner, spec),
                              body.get("status") or {}, result.degraded, result.message,
                              spec.autoscaling.enabled)
