"""The per-stage scaling policy: a pure recommendation from one window of
metrics, wrapped by `StageScaler`, which adds the hygiene autoscalers learned
the hard way (tolerances, stabilisation, cooldowns, bounded steps, no step
while pods are pending, scale-down only when N-1 replicas absorb the load,
warm-up ignored, min/max and a GPU budget respected)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from epd.slo import SLO
from epd.stages import STAGES

from .perfmodel import PerformanceModel

KV_TARGET = 0.9  # KV pool usage the predictive floor plans for: preemption starts at 100%


@dataclass(frozen=True)
class StageMetrics:
    replicas: int  # desired replicas currently set (starting ones included)
    pending: int = 0  # of those, replicas still starting (pods not yet ready)
    queue: int = 0  # encode: images waiting; prefill: requests waiting; decode: sequences waiting
    busy: float = 0.0  # busy fraction over the window, 0..1
    latency: float = 0.0  # stage latency p90 (s)
    kv_usage: float = 0.0  # decode only, 0..1
    occupancy: float = 0.0  # decode only: active + waiting sequences / (replicas x batch limit); > 1 = queued

    def load(self, stage: str) -> float:
        """The utilisation that matters for the stage: continuous batching keeps decode 'busy' at any
        load, so decode is measured by batch occupancy and KV usage instead."""
        return max(self.occupancy, self.kv_usage) if stage == "decode" else self.busy


@dataclass(frozen=True)
class ObservedWindow:
    time: float
    seconds: float
    arrival_rate: float  # requests/s
    images_per_request: float
    prompt_tokens: float  # mean, images included
    output_tokens: float  # mean
    ttft_p90: float
    tpot_p90: float
    stages: dict[str, StageMetrics]


@dataclass(frozen=True)
class ScalingDecision:
    stage: str
    current: int
    desired: int
    reason: str


@dataclass(frozen=True)
class PolicyConfig:
    slo: SLO
    min_replicas: dict[str, int] = field(default_factory=lambda: {s: 1 for s in STAGES})
    max_replicas: dict[str, int] = field(default_factory=lambda: {s: 64 for s in STAGES})
    gpu_budget: int = 0  # 0 = no total limit; otherwise stages share it (replicas move between stages)
    target_busy: float = 0.7
    up_tolerance: float = 0.1
    down_tolerance: float = 0.3
    up_cooldown: float = 15.0
    down_cooldown: float = 60.0
    down_stabilization: float = 90.0
    max_step_up: int = 4
    max_step_down_fraction: float = 0.25  # of current replicas per step (at least 1)
    warmup: float = 30.0
    drain_seconds: float = 30.0  # a backlog should be gone within this long
    startup_delay: float = 30.0  # how long a new replica takes to serve (pod start + model load)
    decode_batch: int = 128
    encode_image: tuple[int, int] = (1024, 1024)

    def __post_init__(self) -> None:
        if not 0 < self.target_busy < 1:
            raise ValueError("target_busy must be in (0, 1)")
        for stage in STAGES:
            if self.min_replicas[stage] > self.max_replicas[stage]:
                raise ValueError(f"{stage}: min_replicas > max_replicas")


def predictive_floor(window: ObservedWindow, model: PerformanceModel, config: PolicyConfig) -> dict[str, int]:
    """Replicas each stage needs for the observed arrival rate and mix, at the target utilisation."""
    costs, arch = model.costs, model.architecture
    width, height = config.encode_image
    image_seconds = costs.encode_time(arch.vision_patch_tokens(width, height), width * height / 1e6)
    prefill_seconds = costs.prefill_time([max(1, int(window.prompt_tokens))])
    # Work arriving, plus the backlog expected by the time new replicas are up (queued now, and what
    # the current replicas cannot absorb meanwhile), drained within `drain_seconds`.
    demand = {"encode": (window.arrival_rate * window.images_per_request, image_seconds),
              "prefill": (window.arrival_rate, prefill_seconds)}
    load = {}
    for stage, (rate, seconds) in demand.items():
        capacity = window.stages[stage].replicas / seconds if seconds else math.inf
        backlog = window.stages[stage].queue + max(0.0, rate - capacity) * config.startup_delay
        load[stage] = (rate + backlog / config.drain_seconds) * seconds
    encode, prefill = load["encode"], load["prefill"]
    batch = max(1, min(config.decode_batch, math.ceil(window.arrival_rate * window.output_tokens * config.slo.tpot_seconds)))
    context = window.prompt_tokens + window.output_tokens / 2
    step = costs.decode_time(batch, int(batch * context))
    decode = window.arrival_rate * window.output_tokens * step / batch
    # the sequences decoding at once must also fit the decode GPUs' KV pools (up to KV_TARGET full; the
    # division by target_busy below is undone so that the KV floor has its own headroom)
    held = window.arrival_rate * window.output_tokens * step * context
    kv_share = held / max(1, model.kv_capacity_tokens(config.decode_batch)) / KV_TARGET
    decode = max(decode, kv_share * config.target_busy)
    return {stage: math.ceil(load / config.target_busy - 1e-9)
            for stage, load in (("encode", encode), ("prefill", prefill), ("decode", decode))}


def recommend(window: ObservedWindow, model: PerformanceModel | None,
              config: PolicyConfig) -> dict[str, tuple[int, str]]:
    """Pure: desired replicas per stage and why, before hygiene (no predictive floor without a model)."""
    floor = predictive_floor(window, model, config) if model else {stage: 0 for stage in STAGES}
    slo = config.slo
    ttft_breach = window.ttft_p90 > slo.ttft_seconds * (1 + config.up_tolerance)
    tpot_breach = window.tpot_p90 > slo.tpot_seconds * (1 + config.up_tolerance)
    out: dict[str, tuple[int, str]] = {}
    for stage in STAGES:
        m = window.stages[stage]
        load = m.load(stage)
        ratio = load / config.target_busy
        if 1 - config.down_tolerance <= ratio <= 1 + config.up_tolerance:
            utilisation = m.replicas  # inside the tolerance band: no change from utilisation alone
        else:
            utilisation = math.ceil(m.replicas * ratio - 1e-9) if m.replicas else 0
        desired, reason = max(floor[stage], utilisation, 0), f"floor {floor[stage]}, utilisation {load:.0%}"
        backlog = m.queue > (config.decode_batch if stage == "decode" else m.replicas)
        if stage in ("encode", "prefill") and ttft_breach and (backlog or m.busy > config.target_busy):
            desired = max(desired, m.replicas + max(1, math.ceil(m.replicas * (window.ttft_p90 / slo.ttft_seconds - 1))))
            reason = f"TTFT p90 {window.ttft_p90:.2f}s > {slo.ttft_seconds}s with {stage} backlog {m.queue}"
        if stage == "decode" and (tpot_breach or m.kv_usage > 0.9 or (backlog and load > config.target_busy)):
            pressure = max(window.tpot_p90 / slo.tpot_seconds, m.kv_usage / 0.8, m.occupancy / config.target_busy, 1.0)
            desired = max(desired, m.replicas + max(1, math.ceil(m.replicas * (pressure - 1))))
            reason = (f"TPOT p90 {window.tpot_p90 * 1000:.0f}ms vs {slo.tpot_seconds * 1000:.0f}ms, KV {m.kv_usage:.0%}, "
                      f"batch occupancy {m.occupancy:.0%}")
        out[stage] = (desired, reason)
    return out


def survivors_absorb(stage: str, metrics: StageMetrics, config: PolicyConfig, removed: int = 1) -> bool:
    """Scale-down guard: would N-k replicas stay under the target with the same work?"""
    if metrics.replicas - removed < 1:
        return False
    load = metrics.load(stage) * metrics.replicas / (metrics.replicas - removed)
    return load <= config.target_busy * (1 - config.down_tolerance / 2)


@dataclass
class StageScaler:
    """Stateful hygiene around `recommend`; one per EPDDeployment."""

    model: PerformanceModel | None
    config: PolicyConfig
    started: float = 0.0
    last_change: dict[str, float] = field(default_factory=dict)
    history: dict[str, deque[tuple[float, int]]] = field(default_factory=lambda: {s: deque() for s in STAGES})

    def decide(self, window: ObservedWindow) -> list[ScalingDecision]:
        if window.time - self.started < self.config.warmup:
            return []  # warm-up: the first samples describe cold caches and loading pods
        self._window = window
        recommended = recommend(window, self.model, self.config)
        decisions = []
        for stage in STAGES:
            m = window.stages[stage]
            desired, reason = recommended[stage]
            self._remember(stage, window.time, desired)
            decision = self._hygiene(stage, m, desired, reason, window.time)
            if decision is not None:
                decisions.append(decision)
        decisions = self._fit_budget(decisions, window)
        for d in decisions:
            self.last_change[d.stage] = window.time
        return decisions

    def _remember(self, stage: str, now: float, desired: int) -> None:
        history = self.history[stage]
        history.append((now, desired))
        while history and history[0][0] < now - self.config.down_stabilization:
            history.popleft()

    def _hygiene(self, stage: str, m: StageMetrics, desired: int, reason: str, now: float) -> ScalingDecision | None:
        cfg = self.config
        current = m.replicas
        if m.pending:
            return None  # never step while the last step's pods are still pending
        desired = min(max(desired, cfg.min_replicas[stage]), cfg.max_replicas[stage])
        since = now - self.last_change.get(stage, -math.inf)
        if desired > current:
            if since < cfg.up_cooldown:
                return None
            desired = min(desired, current + cfg.max_step_up)
            return ScalingDecision(stage, current, desired, f"scale up: {reason}")
        if desired < current:
            # stabilisation: only go as low as the highest recommendation of the recent window
            desired = max(desired, max(d for _, d in self.history[stage]))
            desired = max(desired, current - max(1, int(current * cfg.max_step_down_fraction)))
            while desired < current and not survivors_absorb(stage, m, cfg, current - desired):
                desired += 1
            if desired >= current or since < cfg.down_cooldown or not self._slo_headroom(stage):
                return None
            return ScalingDecision(stage, current, desired, f"scale down: {reason}")
        return None

    def _slo_headroom(self, stage: str) -> bool:
        """Shrink a stage only while the latency it drives is comfortably inside the SLO."""
        window, slo, margin = self._window, self.config.slo, 1 - self.config.down_tolerance
        if stage == "decode":
            return window.tpot_p90 <= slo.tpot_seconds * margin
        return window.ttft_p90 <= slo.ttft_seconds * margin

    def _fit_budget(self, decisions: list[ScalingDecision], window: ObservedWindow) -> list[ScalingDecision]:
        """Under a GPU budget, growth is paid for by shrinking the least busy stage that can spare a replica."""
        budget = self.config.gpu_budget
        if not budget:
            return decisions
        planned: dict[str, int] = {s: window.stages[s].replicas for s in STAGES}  # pending ones included
        for d in decisions:
            planned[d.stage] = d.desired
        result = {d.stage: d for d in decisions}
        while sum(planned.values()) > budget:
            donors = [s for s in STAGES if planned[s] > self.config.min_replicas[s]
                      and planned[s] <= window.stages[s].replicas and not window.stages[s].pending
                      and survivors_absorb(s, window.stages[s], self.config,
                                           window.stages[s].replicas - planned[s] + 1)]
            growers = [d.stage for d in decisions if d.desired > d.current]
            if donors:
                donor = min(donors, key=lambda s: window.stages[s].load(s))
                planned[donor] -= 1
                result[donor] = ScalingDecision(donor, window.stages[donor].replicas, planned[donor],
                                                f"give a GPU to {', '.join(growers) or 'the budget'} "
                                                f"(load {window.stages[donor].load(donor):.0%})")
            elif growers:
                grower = growers[-1]
                planned[grower] -= 1
                if planned[grower] <= window.stages[grower].replicas:
                    result.pop(grower, None)
                    growers.remove(grower)
                else:
                    reason = result[grower].reason.removesuffix(" (capped by the GPU budget)")
                    result[grower] = ScalingDecision(grower, window.stages[grower].replicas, planned[grower],
                                                     reason + " (capped by the GPU budget)")
            else:
                break
        return [d for d in result.values() if d.desired != d.current]


@dataclass
class UtilisationScaler:
    """HPA-like baseline: replicas follow the busy fraction only (no SLOs, no model)."""

    config: PolicyConfig
    last_change: dict[str, float] = field(default_factory=dict)

    def decide(self, window: ObservedWindow) -> list[ScalingDecision]:
        out = []
        for stage in STAGES:
            m = window.stages[stage]
            if m.pending or not m.replicas:
                continue
            ratio = m.busy / self.config.target_busy
            if abs(ratio - 1) <= self.config.up_tolerance:
                continue
            desired = min(max(math.ceil(m.replicas * ratio), self.config.min_replicas[stage]),
                          self.config.max_replicas[stage])
            cooldown = self.config.up_cooldown if desired > m.replicas else self.config.down_cooldown
            if desired != m.replicas and window.time - self.last_change.get(stage, -math.inf) >= cooldown:
                self.last_change[stage] = window.time
                out.append(ScalingDecision(stage, m.replicas, desired, f"busy {m.busy:.0%}"))
        return out
