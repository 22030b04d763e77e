"""The one percentile of the project: linear interpolation. The benchmark's
and the simulator's latency summaries take it over samples; the autoscaler
takes it over histogram buckets, as Prometheus' `histogram_quantile` does, so a
`spec.slo.percentile` means the same wherever it is measured.

Percentiles are given from 0 to 100 (the SLO's `percentile`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

SUMMARY_PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile of `values`, interpolated linearly between the two closest ranks
    (numpy's default method): with two samples p50 is their mean. 0.0 for no values."""
    _check(p)
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90 and p99 of `values` (all 0.0 for none): a latency summary."""
    summary = {"mean": statistics.fmean(values) if values else 0.0}
    summary.update({f"p{p}": percentile(values, p) for p in SUMMARY_PERCENTILES})
    return summary


def histogram_percentile(buckets: Mapping[float, float], p: float) -> float:
    """The p-th percentile of a histogram given as cumulative counts per upper bound (`le`),
    interpolated linearly inside its bucket like PromQL's `histogram_quantile(p / 100, ...)`;
    the largest finite bound when it falls in the +Inf bucket; 0.0 with no observations."""
    _check(p)
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return 0.0
    rank = p / 100 * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def _check(p: float) -> None:
    if not 0 <= p <= 100:
        raise ValueError(f"a percentile is between 0 and 100, got {p}")
