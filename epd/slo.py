"""The service-level objective, one type for the operator's `spec.slo`, the
planner and its simulator, the scaler and the benchmark: `percentile` percent
of requests must reach their first token within `ttft_seconds` and then keep
a time per output token within `tpot_seconds`. An infinite target is no target
(the benchmark's default)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    ttft_seconds: float = math.inf
    tpot_seconds: float = math.inf
    percentile: int = 90  # the share of requests (in %) the targets hold for

    def __post_init__(self) -> None:
        if not (self.ttft_seconds > 0 and self.tpot_seconds > 0):
            raise ValueError(f"SLO targets must be > 0 (got TTFT {self.ttft_seconds}, TPOT {self.tpot_seconds})")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"the SLO percentile must be in (0, 100], got {self.percentile}")

    @property
    def attainment(self) -> float:
        """The fraction of requests that must meet the targets (percentile 90 -> 0.9)."""
        return self.percentile / 100

    def met(self, ttft: float, tpot: float) -> bool:
        """Whether one request with these latencies meets both targets."""
        return ttft <= self.ttft_seconds and tpot <= self.tpot_seconds

    def to_json(self) -> dict[str, float | int | None]:
        """For reports: targets in seconds (None: no target) and the percentile."""
        return {"ttft_s": _finite(self.ttft_seconds), "tpot_s": _finite(self.tpot_seconds),
                "percentile": self.percentile}


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value
