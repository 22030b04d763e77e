"""What a scaling window writes into the EPDDeployment's status."""

from __future__ import annotations

from typing import Any

from ..status import now
from .controller import Outcome

HISTORY = 20  # scaling decisions kept in status.scalingHistory


def scaling_status(outcome: Outcome, old_status: dict[str, Any]) -> dict[str, Any]:
    """Observed latencies always; per decided stage its new desired replicas and why, plus history."""
    window = outcome.window
    status: dict[str, Any] = {"observed": {"ttftP90Seconds": round(window.ttft_p90, 4),
                                 "tpotP90Seconds": round(window.tpot_p90, 4)}}
    if outcome.decisions:
        stamp = now()
        status["stages"] = {d.stage: {"scaledReplicas": d.desired, "lastScaleTime": stamp, "lastScaleReason": d.reason}
                            for d in outcome.decisions}
        history = list(old_status.get("scalingHistory") or [])
        history += [{"time": stamp, "stage": d.stage, "from": d.current, "to": d.desired, "reason": d.reason}
                    for d in outcome.decisions]
        status["scalingHistory"] = history[-HISTORY:]
    return status
