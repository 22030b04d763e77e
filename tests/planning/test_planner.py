"""The planner's search against exhaustive search, memory-aware starting points, and its recommendation."""

from __future__ import annotations

import pytest

from epd.image_size import ImageSize
from epd.operator.sizing.architectures import get_architecture
from epd.operator.sizing.explain import bound, statement
from epd.operator.sizing.hardware import get_hardware
from epd.operator.sizing.perfmodel import roofline
from epd.operator.sizing.planner import Planner, SearchSpace
from epd.operator.sizing.simulator import ServingConfig
from epd.operator.sizing.workload import WorkloadMix, poisson
from epd.slo import SLO

SMALL_SPACE = SearchSpace(encode_batches=(2, 16), prefill_budgets=(4096, 16384), decode_batches=(8, 128))

SCENARIOS = {
    # compute-bound: MiniCPM-V 2.6 with four 4K photos per request on A100s
    "photos": (roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb")),
               WorkloadMix(4, ImageSize(4032, 3024), 22, 10), SLO(2.6, 0.04), 0.5),
    # memory shapes the space: Qwen2.5-VL's 2048x2048 image needs 2 GB of vision activations, so a bundled
    # L40S cannot reserve for 16 of them; long outputs fill the KV pools
    "native-resolution": (roofline(get_architecture("qwen2.5-vl-7b"), get_hardware("l40s")),
                          WorkloadMix(1, ImageSize(2048, 2048), 64, 512), SLO(2.0, 0.08), 1.0),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_search_finds_what_exhaustive_search_finds(scenario):
    model, mix, slo, rate = SCENARIOS[scenario]
    planner = Planner(model, poisson(rate, 80, mix, seed=1), slo, SMALL_SPACE)
    recommendation = planner.recommend(4)
    searched = planner.evaluations
    for mode, plan in recommendation.by_mode.items():
        assert plan.goodput_rps == planner.exhaustive(mode, 4).goodput_rps, mode
    assert planner.evaluations > searched  # the exhaustive pass scored configurations the search skipped
    everything = max(recommendation.by_mode.values(), key=lambda p: p.goodput_rps)
    assert recommendation.best.goodput_rps == everything.goodput_rps > 0


def test_placements_start_from_batch_limits_that_fit():
    model, mix, slo, rate = SCENARIOS["native-resolution"]
    planner = Planner(model, poisson(rate, 40, mix, seed=1), slo, SMALL_SPACE)
    default = ServingConfig("bundled", 3, decode=1)  # reserves activations for 16 of the largest images
    assert planner.score(default).problem.startswith("encode+prefill: weights 16.6 GB + runtime 1.5 GB")
    assert planner.score(default).goodput_rps == 0
    fitted = planner.fit_to_memory(default)
    assert fitted.encode_batch == 2 and not planner.score(fitted).problem


def test_recommendation_says_which_mode_wins_and_what_bounds_each():
    model, mix, slo, rate = SCENARIOS["photos"]
    planner = Planner(model, poisson(rate, 80, mix, seed=1), slo, SMALL_SPACE)
    recommendation = planner.recommend(4)
    # four GPUs: three E+P GPUs out-serve two encode + one prefill GPU when each request brings 4 photos
    assert recommendation.best.config.label() == "3EP1D"
    assert statement(recommendation).startswith(
        "Recommended: bundled 3EP1D (22% more goodput than EPD 2E1P1D). EPD does not win here: EPD 2E1P1D, EPD's "
        "best, reaches 1.047 req/s. The operator deploys EPD only; `--mode epd` plans and prints an EPDDeployment")
    bounds = {mode: bound(plan, slo).split(";")[0] for mode, plan in recommendation.by_mode.items()}
    assert bounds == {"epd": "encode (latency: 7 of 80 requests miss TTFT 2.6 s at 61% busy",
                      "bundled": "encode+prefill (latency: 8 of 80 requests miss TTFT 2.6 s at 61% busy",
                      "colocated": "prefills pausing decode (latency: 7 of 80 requests miss TPOT 40 ms at 40% busy"}
