"""Runs a scaling policy closed-loop inside the simulator (EPD mode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from epd.percentiles import percentile
from epd.slo import SLO
from epd.stages import STAGES

from .perfmodel import PerformanceModel
from .results import report
from .scaling import ObservedWindow, ScalingDecision, StageMetrics
from .simulator import Observation, ServingConfig, Simulation
from .workload import SimRequest, rescale


class Policy(Protocol):
    def decide(self, window: ObservedWindow) -> list[ScalingDecision]: ...


@dataclass
class WindowBuilder:
    """Turns the simulator's raw observation into the policy's metric window: latencies at the
    SLO's percentile, as the operator measures them."""

    model: PerformanceModel
    slo: SLO
    last: ObservedWindow | None = None

    def __call__(self, obs: Observation) -> ObservedWindow:
        done = obs.completed
        if done:
            images = sum(len(r.images) for r in done) / len(done)
            prompt = sum(r.prompt_tokens for r in done) / len(done)
            output = sum(r.output_tokens for r in done) / len(done)
        elif self.last is not None:
            images, prompt, output = self.last.images_per_request, self.last.prompt_tokens, self.last.output_tokens
        else:
            images, prompt, output = 0.0, 1.0, 1.0
        stages: dict[str, StageMetrics] = {stage: StageMetrics(replicas=obs.replicas.get(stage, 0), pending=obs.pending.get(stage, 0),
                                      queue=obs.queue.get(stage, 0), busy=obs.busy.get(stage, 0.0),
                                      kv_usage=obs.kv_usage if stage == "decode" else 0.0,
                                      occupancy=obs.occupancy if stage == "decode" else 0.0) for stage in STAGES}
        window = ObservedWindow(time=obs.time, seconds=obs.window, arrival_rate=obs.arrivals / obs.window,
                                images_per_request=obs.images / obs.arrivals if obs.arrivals else images,
                                prompt_tokens=prompt, output_tokens=output,
                                ttft_p90=percentile([r.ttft for r in done], self.slo.percentile),
                                tpot_p90=percentile([r.tpot for r in done if r.output_tokens > 1], self.slo.percentile),
                                stages=stages)
        self.last = window
        return window


def run_closed_loop(model: PerformanceModel, start: ServingConfig, requests: list[SimRequest], slo: SLO,
                    policy: Policy, interval: float = 10.0, startup_delay: float = 30.0) -> dict[str, Any]:
    """Simulate with `policy` resizing the pools every `interval` seconds; returns the summary plus
    the scaling history."""
    sim = Simulation(model, start, startup_delay=startup_delay)
    windows = WindowBuilder(model, slo)
    history: list[dict[str, Any]] = []

    def control(obs: Observation) -> dict[str, int]:
        decisions = policy.decide(windows(obs))
        for d in decisions:
            history.append({"time": round(obs.time, 1), "stage": d.stage, "from": d.current, "to": d.desired,
                            "reason": d.reason})
        return {d.stage: d.desired for d in decisions}

    done = sim.run(rescale(requests, 1.0), controller=control, interval=interval)
    summary = report(sim, done, slo)
    summary["scaling_history"] = history
    summary["final_replicas"] = {name: len(pool) for name, pool in sim.pools.items()}
    return summary
