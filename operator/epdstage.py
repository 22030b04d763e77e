"""Per-stage scale objects: the EPDStage of each stage, and who decides its replicas.

A stage runs the replicas in its EPDStage's `spec.replicas`. Writers, in order:
1. The EPDDeployment: when the user edits `spec.<stage>.replicas`, the new value is
   written through (recorded as `status.stages.<stage>.declaredReplicas`).
2. With `autoscaling.enabled`, the built-in autoscaler: its last choice
   (`scaledReplicas`) wins, and another writer's value is reverted.
3. Otherwise whoever scales the EPDStage: `kubectl scale`, an HPA, KEDA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .crd import GROUP, VERSION
from .naming import Owner, child_name, meta, selector_string
from .spec import StageSpec
from .stage_crd import KIND

API_VERSION = f"{GROUP}/{VERSION}"
CREATED = "created"
DECLARED = "spec replicas of the EPDDeployment changed"
AUTOSCALER = "the built-in autoscaler's choice; it owns the replicas while spec.autoscaling.enabled"


@dataclass(frozen=True)
class StageReplicas:
    replicas: int  # what the stage runs
    write: str = ""  # why the EPDStage must be set to it ("" = it already is)


def scale_object(owner: Owner, stage: str, replicas: int | None = None) -> dict[str, Any]:
    """The EPDStage as the operator applies it; `replicas` only when creating it (afterwards the
    field belongs to whoever scales the stage, so server-side apply must not claim it)."""
    spec: dict[str, Any] = {"deployment": owner.name, "stage": stage}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta(owner, child_name(owner, stage), stage),
            "spec": spec}


def decide(stage: StageSpec, autoscaling: bool, record: dict[str, Any], scale: dict[str, Any] | None,
           statefulset: dict[str, Any] | None) -> StageReplicas:
    """Replicas of one stage from the spec, the status record, its EPDStage and StatefulSet (None: absent)."""
    chosen = record.get("scaledReplicas") if autoscaling else None
    if scale is None:  # (re)created: keep what runs, else the scaler's choice, else the spec
        running = (statefulset or {}).get("spec", {}).get("replicas")
        start = chosen if chosen is not None else running if running is not None else stage.replicas
        return StageReplicas(start, CREATED)
    current = scale.get("spec", {}).get("replicas", stage.replicas)
    declared = record.get("declaredReplicas")
    if declared is not None and declared != stage.replicas:
        return StageReplicas(stage.replicas, DECLARED)
    if chosen is not None and current != chosen:
        return StageReplicas(chosen, AUTOSCALER)
    return StageReplicas(current)


def status(owner: Owner, stage: str, scale: dict[str, Any], statefulset: dict[str, Any] | None) -> dict[str, Any]:
    observed = (statefulset or {}).get("status", {})
    return {"replicas": observed.get("replicas", 0) or 0, "readyReplicas": observed.get("readyReplicas", 0) or 0,
            "selector": selector_string(owner, stage), "observedGeneration": scale["metadata"].get("generation", 0)}
