"""The simulator reproduces the direction of the paper's findings."""

from __future__ import annotations

from epd.image_size import ImageSize
from epd.operator.sizing.architectures import get_architecture
from epd.operator.sizing.hardware import get_hardware
from epd.operator.sizing.limits import memory_limits
from epd.operator.sizing.perfmodel import roofline
from epd.operator.sizing.results import goodput, simulate
from epd.operator.sizing.simulator import ServingConfig, Simulation
from epd.operator.sizing.stage_report import pool_report
from epd.operator.sizing.workload import SimRequest, WorkloadMix, poisson
from epd.slo import SLO

from .scenarios import MINICPM_A100

EIGHT_4K = WorkloadMix(images_per_request=8, image_size=ImageSize(4032, 3024), text_tokens=22, output_tokens=10)
SLO_8 = SLO(5.1, 0.06)


def test_intra_request_parallelism_and_disaggregation_cut_ttft():
    requests = poisson(0.25, 100, EIGHT_4K, seed=1)
    ttft = {name: simulate(MINICPM_A100, config, requests, SLO_8)["ttft_s"]["p50"] for name, config in {
        "epd": ServingConfig("epd", 6, 1, 1), "no_irp": ServingConfig("epd", 6, 1, 1, intra_request_parallel=False),
        "bundled": ServingConfig("bundled", encode=7, decode=1)}.items()}
    assert ttft["no_irp"] / ttft["epd"] > 2.0  # the paper: 2.5x at 8 images (1.74 s vs 4.27 s)
    assert ttft["epd"] < 0.5 * ttft["bundled"]  # the paper: up to 71.9% lower than bundled


def test_every_request_completes_and_gpu_seconds_add_up():
    requests = poisson(1.0, 300, WorkloadMix(2, ImageSize(1024, 768), 64, 32), seed=2)
    sim = Simulation(MINICPM_A100, ServingConfig("epd", 2, 1, 1))
    done = sim.run(requests)
    assert all(r.finish >= r.first_token >= r.arrival for r in done)
    makespan = max(r.finish for r in done)
    assert abs(sim.gpu_seconds - 4 * makespan) < 1e-6


def test_goodput_is_the_rate_at_90_percent_attainment():
    requests = poisson(1.0, 200, WorkloadMix(4, ImageSize(1024, 1024), 64, 32), seed=4)
    rate, summary = goodput(MINICPM_A100, ServingConfig("epd", 3, 1, 1), requests, SLO(1.5, 0.05))
    assert rate > 0 and summary["slo_attainment"] >= 0.9
    faster = simulate(MINICPM_A100, ServingConfig("epd", 3, 1, 1), [r for r in _scaled(requests, 2.5 * rate)],
                      SLO(1.5, 0.05))
    assert faster["slo_attainment"] < 0.9


def _scaled(requests, rate):
    from epd.operator.sizing.workload import rescale

    base = len(requests) / (requests[-1].arrival - requests[0].arrival)
    return rescale(requests, rate / base)


def _burst(count: int, images: int, size: tuple[int, int], text: int, output: int) -> list[SimRequest]:
    """`count` requests arriving at once, so that queues hold more than any batch limit."""
    return [SimRequest(i, 0.0, [ImageSize(*size)] * images, text, output) for i in range(count)]


def test_an_encode_batch_that_does_not_fit_is_never_formed():
    model = roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb"), "eager")
    config = ServingConfig("epd", 1, 1, 1, intra_request_parallel=False, encode_batch=256)
    fits = memory_limits(model, config, ImageSize(4032, 3024), 22, 10).encode_batch
    assert 8 < fits < 256  # memory, not the batch limit, bounds the encode batch (1.8 GB per photo)
    sim = Simulation(model, config)
    done = sim.run(_burst(20, 8, (4032, 3024), 22, 10))
    encode = pool_report(sim)["encode"]
    assert encode["largest_batch"] == fits and encode["memory_limited_batches"] > 0
    assert encode["peak_activation_gb"] <= encode["activation_gb"]  # both rounded to MB
    assert all(r.finish > 0 for r in done)


def test_a_bundled_gpu_never_encodes_more_images_than_its_reserve_holds():
    model = roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb"), "eager")
    sim = Simulation(model, ServingConfig("bundled", 1, decode=1, encode_batch=8))
    requests = _burst(6, 8, (4032, 3024), 22, 10) + [SimRequest(6, 0.0, [ImageSize(4032, 3024)] * 9, 22, 10)]
    done = sim.run(requests)
    holder = pool_report(sim)["prefill"]
    assert holder["largest_batch"] == 1 and holder["memory_limited_batches"] > 0  # two requests' 16 photos never fit
    assert holder["peak_activation_gb"] <= holder["activation_gb"]
    assert [r.finish > 0 for r in done] == [True] * 6 + [False]
    assert done[6].rejected == ("its 9 images need 16.4 GB of vision activations in one forward; "
                                "an encode+prefill GPU reserves 14.6 GB")


def test_kv_exhaustion_preempts_and_every_sequence_still_finishes():
    model = roofline(get_architecture("llava-1.5-7b"), get_hardware("l40s"))
    requests = _burst(60, 1, (336, 336), 64, 2000)
    sim = Simulation(model, ServingConfig("epd", 1, 1, 1, decode_batch=64))
    done = sim.run(requests)
    decode = pool_report(sim)["decode"]
    capacity = sim.memory["decode"].kv_tokens
    assert 640 * 64 < capacity < 2640 * 64  # every sequence fits when it joins, not when it has grown
    assert decode["preemptions"] > 0 and decode["peak_kv_tokens"] <= capacity
    assert all(r.finish > 0 and r.generated == 2000 for r in done)
    assert any(r.preemptions for r in done)
    roomy = Simulation(roofline(get_architecture("llava-1.5-7b"), get_hardware("h200")),
                       ServingConfig("epd", 1, 1, 1, decode_batch=64))
    roomy.run(_burst(60, 1, (336, 336), 64, 2000))
    assert pool_report(roomy)["decode"]["preemptions"] == 0


def test_requests_that_can_never_fit_are_rejected_with_the_reason():
    model = roofline(get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))
    too_long = SimRequest(0, 0.0, [ImageSize(336, 336)], 3600, 100)
    summary = simulate(model, ServingConfig("epd", 1, 1, 1), [too_long], SLO(2.0, 0.05))
    assert summary["completed"] == 0 and summary["rejected"] == 1
    assert summary["rejections"] == {"4276 tokens exceed the 4096-token context": 1}
