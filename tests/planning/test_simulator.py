"""The simulator reproduces the direction of the paper's findings."""

from __future__ import annotations

from epd.operator.sizing.results import SLO, goodput, simulate
from epd.operator.sizing.simulator import ServingConfig, Simulation
from epd.operator.sizing.workload import WorkloadMix, poisson

from .scenarios import MINICPM_A100

EIGHT_4K = WorkloadMix(images_per_request=8, image_size=(4032, 3024), text_tokens=22, output_tokens=10)
SLO_8 = SLO(5.1, 0.06)


def test_intra_request_parallelism_and_disaggregation_cut_ttft():
    requests = poisson(0.25, 100, EIGHT_4K, seed=1)
    ttft = {name: simulate(MINICPM_A100, config, requests, SLO_8)["ttft_s"]["p50"] for name, config in {
        "epd": ServingConfig("epd", 6, 1, 1), "no_irp": ServingConfig("epd", 6, 1, 1, intra_request_parallel=False),
        "bundled": ServingConfig("bundled", encode=7, decode=1)}.items()}
    assert ttft["no_irp"] / ttft["epd"] > 2.0  # the paper: 2.5x at 8 images (1.74 s vs 4.27 s)
    assert ttft["epd"] < 0.5 * ttft["bundled"]  # the paper: up to 71.9% lower than bundled


def test_every_request_completes_and_gpu_seconds_add_up():
    requests = poisson(1.0, 300, WorkloadMix(2, (1024, 768), 64, 32), seed=2)
    sim = Simulation(MINICPM_A100, ServingConfig("epd", 2, 1, 1))
    done = sim.run(requests)
    assert all(r.finish >= r.first_token >= r.arrival for r in done)
    makespan = max(r.finish for r in done)
    assert abs(sim.gpu_seconds - 4 * makespan) < 1e-6


def test_goodput_is_the_rate_at_90_percent_attainment():
    requests = poisson(1.0, 200, WorkloadMix(4, (1024, 1024), 64, 32), seed=4)
    rate, summary = goodput(MINICPM_A100, ServingConfig("epd", 3, 1, 1), requests, SLO(1.5, 0.05))
    assert rate > 0 and summary["slo_attainment"] >= 0.9
    faster = simulate(MINICPM_A100, ServingConfig("epd", 3, 1, 1), [r for r in _scaled(requests, 2.5 * rate)],
                      SLO(1.5, 0.05))
    assert faster["slo_attainment"] < 0.9


def _scaled(requests, rate):
    from epd.operator.sizing.workload import rescale

    base = len(requests) / (requests[-1].arrival - requests[0].arrival)
    return rescale(requests, rate / base)
