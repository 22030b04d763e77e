"""Pure status computation: observed child state in, the EPDDeployment's
status (observedGeneration, conditions keyed by type, per-stage counts) out."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

STAGE_CONDITIONS = {"encode": "EncodeReady", "prefill": "PrefillReady", "decode": "DecodeReady"}


@dataclass(frozen=True)
class WorkloadState:
    desired: int
    replicas: int
    ready: int
    updated: int

    @classmethod
    def of(cls, obj: dict[str, Any] | None, desired: int) -> WorkloadState:
        status = (obj or {}).get("status", {})
        return cls(desired, status.get("replicas", 0), status.get("readyReplicas", 0),
                   status.get("updatedReplicas", 0))

    @property
    def is_ready(self) -> bool:
        return self.ready >= self.desired

    @property
    def settled(self) -> bool:
        return self.is_ready and self.replicas == self.desired and self.updated >= self.desired


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(old: list[dict[str, Any]], new: list[Condition], generation: int) -> list[dict[str, Any]]:
    """Conditions keyed by type; lastTransitionTime only moves when the status flips."""
    previous = {c["type"]: c for c in old or []}
    merged = []
    for condition in new:
        status = "True" if condition.status else "False"
        before = previous.get(condition.type)
        since = before.get("lastTransitionTime", now()) if before and before.get("status") == status else now()
        merged.append({"type": condition.type, "status": status, "reason": condition.reason,
                       "message": condition.message, "observedGeneration": generation,
                       "lastTransitionTime": since})
    return merged


def stage_condition(stage: str, state: WorkloadState, problems: str) -> Condition:
    """`<Stage>Ready`; when not ready and its pods report why, the message says it."""
    message = f"{state.ready}/{state.desired} {stage} workers ready"
    if state.is_ready:
        return Condition(STAGE_CONDITIONS[stage], True, "Ready", message)
    return Condition(STAGE_CONDITIONS[stage], False, "PodsFailing" if problems else "Waiting",
                     f"{message}; {problems}" if problems else message)


def compute_status(generation: int, stages: dict[str, WorkloadState], router: WorkloadState, endpoint: str,
                   old_status: dict[str, Any], degraded_reason: str = "", degraded_message: str = "",
                   autoscaling: bool = False, problems: dict[str, str] | None = None) -> dict[str, Any]:
    """`problems`: per stage, why its pods are not ready (see podreport)."""
    conditions = [stage_condition(stage, state, (problems or {}).get(stage, "")) for stage, state in stages.items()]
    all_ready = all(s.is_ready for s in stages.values()) and router.is_ready and not degraded_reason
    waiting = [stage for stage, state in stages.items() if not state.is_ready] + ([] if router.is_ready else ["router"])
    progressing = not all(s.settled for s in (*stages.values(), router))
    conditions += [
        Condition("Ready", all_ready, "AllStagesReady" if all_ready else (degraded_reason or "StagesNotReady"),
                  "every stage and the router are ready" if all_ready else
                  (degraded_message or f"waiting for {', '.join(waiting)}")),
        Condition("Progressing", progressing, "RollingOut" if progressing else "Stable",
                  "replicas are being created or updated" if progressing else "all replicas are up to date"),
        Condition("Degraded", bool(degraded_reason), degraded_reason or "AsExpected",
                  degraded_message or "no problem detected"),
    ]
    if autoscaling:
        conditions.append(Condition("AutoscalingActive", True, "Enabled",
                                    "the scaler sets each stage's replicas within its min/max once per window"))
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(old_status.get("conditions", []), conditions, generation),
        "stages": {stage: {"replicas": state.replicas, "ready": state.ready, "desired": state.desired,
                           "summary": f"{state.ready}/{state.desired}"} for stage, state in stages.items()},
        "endpoint": endpoint,
    }
