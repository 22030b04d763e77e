"""The facts kept once in `epd/`: the percentile, the SLO, image sizes and metric
names, and that the benchmark and the simulator summarise latencies alike."""

from __future__ import annotations

import argparse
import math

import pytest

from epd import metric_names
from epd.bench.client import RequestResult
from epd.bench.report import summarize as bench_summary
from epd.image_size import ImageSize, image_size_argument
from epd.operator.sizing.results import summarize as simulated_summary
from epd.operator.sizing.workload import SimRequest
from epd.percentiles import distribution, histogram_percentile, percentile
from epd.slo import SLO


def test_percentile_interpolates_linearly_between_ranks():
    assert percentile([1.0, 3.0], 50) == 2.0  # two samples: the median is their mean
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 90) == 0.0
    assert distribution([float(v) for v in range(1, 101)]) == pytest.approx(
        {"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_histogram_percentile_interpolates_inside_its_bucket_like_promql():
    assert histogram_percentile({0.1: 5, 0.5: 10, math.inf: 10}, 90) == pytest.approx(0.42)
    assert histogram_percentile({0.1: 0, 0.5: 0, math.inf: 0}, 50) == 0.0  # nothing observed
    assert histogram_percentile({0.1: 1, math.inf: 10}, 99) == 0.1  # beyond the last finite bound


def test_the_benchmark_and_the_simulator_summarise_two_requests_alike():
    measured = [RequestResult(ok=True, ttft=t, e2e=t + 1.0, output_tokens=2) for t in (1.0, 3.0)]
    simulated = [SimRequest(i, 0.0, [], 10, 2, first_token=t, finish=t + 1.0) for i, t in enumerate((1.0, 3.0))]
    slo = SLO(2.0, 10.0)
    bench, sim = bench_summary(measured, 10.0, slo), simulated_summary(simulated, slo, 0.0)
    assert bench["ttft_s"] == sim["ttft_s"] == {"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98}
    assert bench["slo_attainment"] == sim["slo_attainment"] == 0.5


def test_slo_validates_and_reports_its_targets():
    slo = SLO(2.0, 0.1, 95)
    assert slo.attainment == 0.95 and slo.met(2.0, 0.1) and not slo.met(2.01, 0.1)
    assert SLO().to_json() == {"ttft_s": None, "tpot_s": None, "percentile": 90}  # the benchmark's: no targets
    with pytest.raises(ValueError, match="targets must be > 0"):
        SLO(0.0, 0.1)
    with pytest.raises(ValueError, match="percentile"):
        SLO(1.0, 0.1, 0)


@pytest.mark.parametrize("text", ["336", "0x336", "axb", "336x-1", ""])
def test_image_size_parser_names_the_expected_form(text):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        ImageSize.parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        image_size_argument(text)


def test_image_size_parser_reads_width_then_height():
    assert ImageSize.parse(" 1024X768 ") == ImageSize(1024, 768)
    assert str(ImageSize(336, 224)) == "336x224"


def test_metric_names_are_unique_and_histogram_series_map_to_their_metric():
    values = [v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)
              and not k.endswith("_LABEL")]
    assert len(values) == len(set(values)) == len(metric_names.ALL)
    assert all(name.startswith("epd_") for name in metric_names.ALL)
    assert metric_names.base_name("epd_request_ttft_seconds_bucket") == metric_names.REQUEST_TTFT
    assert metric_names.base_name("epd_requests_total") == metric_names.REQUESTS
