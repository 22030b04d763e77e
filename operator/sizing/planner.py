"""`epd plan`'s search: for each serving mode (EPD, encode+prefill bundled,
co-located) the configuration with the most goodput under the SLOs within a
GPU budget (placements, batch limits, intra-request parallelism), and the
recommendation of the best of them.

Successive halving rather than a plain grid: every placement is scored with a
short simulation, the best few are re-scored on the full workload, and each of
those is refined by coordinate descent over the batch limits and the
scheduling policy. Configurations whose GPUs cannot hold their weights, runtime
reserve and activation reserve score zero without being simulated.
`exhaustive` scores every configuration of the space (tests compare the two)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from epd.slo import SLO

from .perfmodel import PerformanceModel
from .results import empty_summary, goodput
from .simulator import MODES, ServingConfig, instance_memory
from .workload import SimRequest

ENCODE_BATCHES = (4, 8, 16, 32)
PREFILL_BUDGETS = (8192, 16384, 32768)
DECODE_BATCHES = (32, 64, 128, 256)


@dataclass(frozen=True)
class SearchSpace:
    encode_batches: tuple[int, ...] = ENCODE_BATCHES  # bundled / co-located: images per prefill batch
    prefill_budgets: tuple[int, ...] = PREFILL_BUDGETS
    decode_batches: tuple[int, ...] = DECODE_BATCHES
    intra_request_parallel: tuple[bool, ...] = (True, False)

    def axes(self, mode: str) -> list[tuple[str, tuple[Any, ...]]]:
        axes: list[tuple[str, tuple[Any, ...]]] = [("encode_batch", self.encode_batches), ("prefill_budget", self.prefill_budgets),
                                         ("decode_batch", self.decode_batches)]
        if mode == "epd":
            axes.insert(1, ("intra_request_parallel", self.intra_request_parallel))
        return axes

    def every_config(self, mode: str, gpus: int) -> Iterator[ServingConfig]:
        names = [name for name, _ in self.axes(mode)]
        for base in placements(mode, gpus):
            for values in itertools.product(*(values for _, values in self.axes(mode))):
                yield replace(base, **dict(zip(names, values, strict=True)))


def stage_splits(gpus: int) -> list[tuple[int, int, int]]:
    return [(e, p, gpus - e - p) for e in range(1, gpus - 1) for p in range(1, gpus - e)]


def placements(mode: str, gpus: int) -> list[ServingConfig]:
    """Every way to give `gpus` GPUs to the mode's pools (default batch limits)."""
    if mode == "epd":
        return [ServingConfig("epd", e, p, d) for e, p, d in stage_splits(gpus)]
    if mode == "bundled":
        return [ServingConfig("bundled", encode=ep, decode=gpus - ep) for ep in range(1, gpus)]
    return [ServingConfig("colocated", colocated=gpus)] if gpus >= 1 else []


MINIMUM_GPUS = {"epd": 3, "bundled": 2, "colocated": 1}


@dataclass(frozen=True)
class ScoredPlan:
    config: ServingConfig
    goodput_rps: float
    summary: dict[str, Any]
    problem: str = ""  # why the configuration does not fit its GPUs ('' when it does)

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {"mode": c.mode, "label": c.label(), "gpus": c.gpus, "encode": c.encode, "prefill": c.prefill,
                "decode": c.decode, "colocated": c.colocated, "intra_request_parallel": c.intra_request_parallel,
                "encode_batch": c.encode_batch, "prefill_budget": c.prefill_budget, "decode_batch": c.decode_batch,
                "goodput_rps": round(self.goodput_rps, 4),
                "slo_attainment": round(self.summary["slo_attainment"], 4),
                "ttft_p90_s": round(self.summary["ttft_s"]["p90"], 4),
                "tpot_p90_s": round(self.summary["tpot_s"]["p90"], 5), "problem": self.problem}


@dataclass(frozen=True)
class Recommendation:
    best: ScoredPlan
    by_mode: dict[str, ScoredPlan] = field(default_factory=dict)

    @property
    def epd(self) -> ScoredPlan | None:
        return self.by_mode.get("epd")


def rank(plan: ScoredPlan) -> tuple[float, bool]:
    """More goodput first; on a tie EPD, the mode the operator deploys."""
    return plan.goodput_rps, plan.config.mode == "epd"


class Planner:
    def __init__(self, model: PerformanceModel, requests: list[SimRequest], slo: SLO,
                 space: SearchSpace = SearchSpace(), progress: Callable[[int], object] = lambda n: None) -> None:
        self.model = model
        self.requests = requests
        self.slo = slo
        self.space = space
        self.progress = progress
        self.evaluations = 0
        self._scored: dict[tuple[ServingConfig, int, int], ScoredPlan] = {}

    def score(self, config: ServingConfig, requests: list[SimRequest] | None = None,
              iterations: int = 10) -> ScoredPlan:
        requests = requests or self.requests
        key = (config, len(requests), iterations)
        if key not in self._scored:
            problem = self._memory_problem(config)
            if problem:
                plan = ScoredPlan(config, 0.0, empty_summary(), problem)
            else:
                rate, summary = goodput(self.model, config, requests, self.slo, iterations)
                plan = ScoredPlan(config, rate, summary)
                self.evaluations += 1
                self.progress(1)
            self._scored[key] = plan
        return self._scored[key]

    def best(self, mode: str, gpus: int, keep: int = 4, refine: int = 3) -> ScoredPlan:
        """The mode's best plan on `gpus` GPUs: placements (with batch limits that fit their memory) scored
        on a quarter of the workload, the `keep` best re-scored on all of it, the `refine` best of those
        refined."""
        if gpus < MINIMUM_GPUS[mode]:
            raise ValueError(f"GPU budget {gpus} is too small for {'EPD' if mode == 'epd' else mode}: "
                             f"it needs {MINIMUM_GPUS[mode]}")
        candidates = [self.fit_to_memory(c) for c in placements(mode, gpus)]
        if len(candidates) > keep:
            quick = self.requests[: max(50, len(self.requests) // 4)]
            candidates = [s.config for s in sorted((self.score(c, quick, 6) for c in candidates), key=rank,
                                                   reverse=True)[:keep]]
        finalists = sorted((self.score(c) for c in candidates), key=rank, reverse=True)
        return max((self._refine(f) for f in finalists[:refine]), key=rank)

    def recommend(self, gpus: int, keep: int = 4, modes: tuple[str, ...] = MODES) -> Recommendation:
        """The best plan of every mode the budget allows, and the best of all."""
        by_mode = {mode: self.best(mode, gpus, keep) for mode in modes if gpus >= MINIMUM_GPUS[mode]}
        if not by_mode:
            raise ValueError(f"GPU budget {gpus} is too small for {', '.join(modes)}")
        return Recommendation(max(by_mode.values(), key=rank), by_mode)

    def fit_to_memory(self, config: ServingConfig) -> ServingConfig:
        """`config`, or the variant with batch limits from the space nearest to its own that fits every
        pool's memory (no simulation needed to tell)."""
        axes = self.space.axes(config.mode)
        names = [name for name, _ in axes]

        def distance(values: tuple[Any, ...]) -> tuple[int, ...]:
            return tuple(abs(values[i] - getattr(config, name)) if isinstance(values[i], int) else 0
                         for i, name in enumerate(names))

        variants = [config] + [replace(config, **dict(zip(names, values, strict=True)))
                               for values in sorted(itertools.product(*(v for _, v in axes)), key=distance)]
        return next((v for v in variants if not self._memory_problem(v)), config)

    def _memory_problem(self, config: ServingConfig) -> str:
        return next((p for p in (layout.problem() for layout in instance_memory(self.model, config).values()) if p), "")

    def exhaustive(self, mode: str, gpus: int) -> ScoredPlan:
        """Every configuration of the space for the mode, each on the full workload."""
        return max((self.score(c) for c in self.space.every_config(mode, gpus)), key=rank)

    def _refine(self, best: ScoredPlan) -> ScoredPlan:
        """Coordinate descent over batch limits and (EPD) intra-request parallelism."""
        axes = self.space.axes(best.config.mode)
        improved = True
        while improved:
            improved = False
            for name, values in axes:
                for value in values:
                    if getattr(best.config, name) == value:
                        continue
                    candidate = self.score(replace(best.config, **{name: value}))
                    if candidate.goodput_rps > best.goodput_rps:
                        best, improved = candidate, True
        return best

    def fewest_gpus(self, target_rate: float, max_gpus: int, mode: str | None = None) -> Recommendation:
        """The smallest budget on which some mode's (or `mode`'s) goodput reaches `target_rate`."""
        modes = (mode,) if mode else MODES
        for gpus in range(min(MINIMUM_GPUS[m] for m in modes), max_gpus + 1):
            recommendation = self.recommend(gpus, keep=2, modes=modes)
            if recommendation.best.goodput_rps >= target_rate:
                return recommendation
        raise ValueError(f"no plan within {max_gpus} GPUs reaches {target_rate} req/s under the SLOs")


def check_fits(model: PerformanceModel, gpus: int) -> None:
    """Refuse budgets no plan can use, with the reason."""
    if gpus < 1:
        raise ValueError(f"GPU budget must be >= 1, got {gpus}")
    problems = [model.instance_memory(role).problem() for role in ("prefill", "encode+prefill")]
    if all(problems):
        raise ValueError(f"{model.architecture.name} does not fit one {model.hardware.name}: {problems[0]} "
                         "(tensor parallelism is not modelled)")


def deployment_manifest(plan: ScoredPlan, model_name: str, slo: SLO, name: str = "epd") -> dict[str, Any]:
    """A ready-to-apply EPDDeployment for an EPD plan."""
    c = plan.config
    gpu = {"limits": {"nvidia.com/gpu": 1}}

    def stage(replicas: int, batch: int, pool: str) -> dict[str, Any]:
        return {"replicas": replicas, "minReplicas": 1, "maxReplicas": max(replicas * 2, 2), "maxBatch": batch,
                "resources": gpu, "nodeSelector": {"epd.dev/pool": pool},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}

    return {"apiVersion": "serving.epd.dev/v1alpha1", "kind": "EPDDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": model_name},
                     "encode": stage(c.encode, c.encode_batch, "gpu-encode"),
                     "prefill": stage(c.prefill, c.prefill_budget, "gpu-prefill"),
                     "decode": stage(c.decode, c.decode_batch, "gpu-decode"),
                     "slo": {"ttftSeconds": slo.ttft_seconds, "tpotSeconds": slo.tpot_seconds,
                             "percentile": slo.percentile},
                     "autoscaling": {"enabled": True}}}
