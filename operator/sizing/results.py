"""Summaries of a simulated run: latency distributions, throughput, SLO
attainment, goodput (the highest rate keeping the SLO's percentile of requests in SLO)."""

from __future__ import annotations

from typing import Any

from epd.percentiles import distribution
from epd.slo import SLO

from .perfmodel import PerformanceModel
from .simulator import ServingConfig, Simulation
from .stage_report import phases, pool_report, rejections, workload_limits
from .workload import SimRequest, rescale


def _met(slo: SLO, request: SimRequest) -> bool:
    return request.finish >= 0 and slo.met(request.ttft, request.tpot)


def summarize(requests: list[SimRequest], slo: SLO, gpu_seconds: float) -> dict[str, Any]:
    done = [r for r in requests if r.finish >= 0]
    span = max(r.finish for r in done) - min(r.arrival for r in requests) if done else 0.0
    return {"requests": len(requests), "completed": len(done),
            "rejected": sum(1 for r in requests if r.rejected), "rejections": dict(list(rejections(requests).items())[:3]),
            "ttft_s": distribution([r.ttft for r in done]),
            "tpot_s": distribution([r.tpot for r in done if r.output_tokens > 1]),
            "e2e_s": distribution([r.e2e for r in done]),
            "throughput_rps": len(done) / span if span else 0.0,
            "slo_attainment": sum(_met(slo, r) for r in requests) / len(requests) if requests else 0.0,
            "missed": {"ttft": sum(1 for r in done if r.ttft > slo.ttft_seconds),
                       "tpot": sum(1 for r in done if r.tpot > slo.tpot_seconds)},
            "gpu_seconds": gpu_seconds}


def empty_summary() -> dict[str, Any]:
    """The summary of a configuration that was not simulated (it does not fit its GPUs)."""
    zero = distribution([])
    return {"requests": 0, "completed": 0, "rejected": 0, "rejections": {}, "ttft_s": zero, "tpot_s": zero,
            "e2e_s": zero, "throughput_rps": 0.0, "slo_attainment": 0.0, "missed": {"ttft": 0, "tpot": 0},
            "gpu_seconds": 0.0, "stages": {},
            "phases_s": {}, "limits": {}}


def report(sim: Simulation, requests: list[SimRequest], slo: SLO) -> dict[str, Any]:
    """The summary of a finished run plus what each pool did and held, and where requests spent time."""
    return {**summarize(requests, slo, sim.gpu_seconds), "stages": pool_report(sim), "phases_s": phases(requests, sim.config.mode),
            "limits": workload_limits(sim, requests)}


def simulate(model: PerformanceModel, config: ServingConfig, requests: list[SimRequest], slo: SLO) -> dict[str, Any]:
    sim = Simulation(model, config)
    return report(sim, sim.run(rescale(requests, 1.0)), slo)


def goodput(model: PerformanceModel, config: ServingConfig, requests: list[SimRequest], slo: SLO,
            iterations: int = 12) -> tuple[float, dict[str, Any]]:
    """Highest arrival rate (req/s) at which the attainment stays >= slo.attainment, by bisection on
    a rate multiplier of the workload; returns (rate, summary at that rate)."""
    span = requests[-1].arrival - requests[0].arrival or 1.0
    base_rate = len(requests) / span
    low, high, best = 0.0, None, None
    factor = 1.0
    for _ in range(iterations):
        summary = simulate(model, config, rescale(requests, factor), slo)
        if summary["slo_attainment"] >= slo.attainment:
            low, best = factor, summary
            factor = factor * 2 if high is None else (factor + high) / 2
        else:
            high = factor
            factor = (low + high) / 2 if low else factor / 2
        if high is not None and low and high / low < 1.05:
            break
    return base_rate * low, best or simulate(model, config, rescale(requests, max(low, 1e-3)), slo)
