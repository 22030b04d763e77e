"""Bench percentile arithmetic."""

from epd.bench.report import percentiles


def test_percentiles_of_one_to_hundred():
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 51.0, "p90": 90.0, "p99": 99.0, "mean": 50.5}


def test_percentiles_of_nothing_are_zero():
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
