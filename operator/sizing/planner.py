"""`epd plan`'s search: the EPD configuration (stage counts, batch limits,
intra-request parallelism) with the most goodput under the SLOs within a GPU
budget, plus the best encode+prefill-bundled and co-located plans to compare.

Successive halving rather than a plain grid: every stage split is scored with
a short simulation, the best few are re-scored on the full workload, and those
are refined by a local search over batch limits and the scheduling policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .perfmodel import PerformanceModel
from .results import SLO, goodput
from .simulator import ServingConfig
from .workload import SimRequest

ENCODE_BATCHES = (4, 8, 16, 32)
PREFILL_BUDGETS = (8192, 16384, 32768)
DECODE_BATCHES = (32, 64, 128, 256)


@dataclass(frozen=True)
class ScoredPlan:
    config: ServingConfig
    goodput_rps: float
    summary: dict

    def as_dict(self) -> dict:
        c = self.config
        return {"mode": c.mode, "label": c.label(), "gpus": c.gpus, "encode": c.encode, "prefill": c.prefill,
                "decode": c.decode, "colocated": c.colocated, "intra_request_parallel": c.intra_request_parallel,
                "encode_batch": c.encode_batch, "prefill_budget": c.prefill_budget, "decode_batch": c.decode_batch,
                "goodput_rps": round(self.goodput_rps, 4),
                "slo_attainment": round(self.summary["slo_attainment"], 4),
                "ttft_p90_s": round(self.summary["ttft_s"]["p90"], 4),
                "tpot_p90_s": round(self.summary["tpot_s"]["p90"], 5)}


def check_fits(model: PerformanceModel, gpus: int) -> None:
    """Refuse budgets no plan can use, with the reason."""
    arch, hw = model.architecture, model.hardware
    if gpus < 1:
        raise ValueError(f"GPU budget must be >= 1, got {gpus}")
    need = arch.llm_weight_bytes + arch.vision_weight_bytes
    if need > hw.memory_bytes * 0.9:
        raise ValueError(f"{arch.name} needs {need / 1e9:.1f} GB of weights; one {hw.name} holds "
                         f"{hw.memory_bytes / 1e9:.0f} GB (tensor parallelism is not modelled)")


def stage_splits(gpus: int) -> list[tuple[int, int, int]]:
    return [(e, p, gpus - e - p) for e in range(1, gpus - 1) for p in range(1, gpus - e)]


class Planner:
    def __init__(self, model: PerformanceModel, requests: list[SimRequest], slo: SLO,
                 progress: Callable[[int], None] = lambda n: None) -> None:
        self.model = model
        self.requests = requests
        self.slo = slo
        self.progress = progress
        self.evaluations = 0

    def score(self, config: ServingConfig, requests: list[SimRequest] | None = None,
              iterations: int = 10) -> ScoredPlan:
        rate, summary = goodput(self.model, config, requests or self.requests, self.slo, iterations)
        self.evaluations += 1
        self.progress(1)
        return ScoredPlan(config, rate, summary)

    def best_epd(self, gpus: int, keep: int = 4) -> ScoredPlan:
        if gpus < 3:
            raise ValueError(f"GPU budget {gpus} is too small for EPD: it needs one GPU per stage (3)")
        quick = self.requests[: max(50, len(self.requests) // 4)]
        coarse = sorted((self.score(ServingConfig("epd", e, p, d), quick, 6) for e, p, d in stage_splits(gpus)),
                        key=lambda s: -s.goodput_rps)
        finalists = [self.score(s.config) for s in coarse[:keep]]
        return self._refine(max(finalists, key=lambda s: s.goodput_rps))

    def best_bundled(self, gpus: int) -> ScoredPlan:
        if gpus < 2:
            raise ValueError(f"GPU budget {gpus} is too small for a bundled plan (needs 2)")
        scored = [self.score(ServingConfig("bundled", encode=ep, decode=gpus - ep), self.requests, 8)
                  for ep in range(1, gpus)]
        return self._refine(max(scored, key=lambda s: s.goodput_rps))

    def best_colocated(self, gpus: int) -> ScoredPlan:
        return self._refine(self.score(ServingConfig("colocated", colocated=gpus), self.requests, 8))

    def _refine(self, best: ScoredPlan) -> ScoredPlan:
        """Coordinate descent over batch limits and (EPD) intra-request parallelism."""
        axes: list[tuple[str, tuple]] = [("prefill_budget", PREFILL_BUDGETS), ("decode_batch", DECODE_BATCHES)]
        if best.config.mode == "epd":
            axes = [("encode_batch", ENCODE_BATCHES), ("intra_request_parallel", (True, False)), *axes]
        improved = True
        while improved:
            improved = False
            for name, values in axes:
                for value in values:
                    if getattr(best.config, name) == value:
                        continue
                    candidate = self.score(replace(best.config, **{name: value}))
                    if candidate.goodput_rps > best.goodput_rps * 1.01:
                        best, improved = candidate, True
        return best

    def fewest_gpus(self, target_rate: float, max_gpus: int) -> ScoredPlan:
        """The smallest EPD plan whose goodput reaches `target_rate`."""
        for gpus in range(3, max_gpus + 1):
            plan = self.best_epd(gpus, keep=2)
            if plan.goodput_rps >= target_rate:
                return plan
        raise ValueError(f"no EPD plan within {max_gpus} GPUs reaches {target_rate} req/s under the SLOs")


def deployment_manifest(plan: ScoredPlan, model_name: str, slo: SLO, name: str = "epd") -> dict:
    """A ready-to-apply EPDDeployment for an EPD plan."""
    c = plan.config
    gpu = {"limits": {"nvidia.com/gpu": 1}}

    def stage(replicas: int, batch: int, pool: str) -> dict:
        return {"replicas": replicas, "minReplicas": 1, "maxReplicas": max(replicas * 2, 2), "maxBatch": batch,
                "resources": gpu, "nodeSelector": {"epd.dev/pool": pool},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}

    return {"apiVersion": "serving.epd.dev/v1alpha1", "kind": "EPDDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": model_name},
                     "encode": stage(c.encode, c.encode_batch, "gpu-encode"),
                     "prefill": stage(c.prefill, c.prefill_budget, "gpu-prefill"),
                     "decode": stage(c.decode, c.decode_batch, "gpu-decode"),
                     "slo": {"ttftSeconds": slo.ttft, "tpotSeconds": slo.tpot, "percentile": 90},
                     "autoscaling": {"enabled": True}}}
