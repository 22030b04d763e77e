"""Summaries of a benchmark run: percentiles, throughput, goodput under SLOs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .client import RequestResult


@dataclass(frozen=True)
class SLO:
    ttft: float | None = None
    tpot: float | None = None

    def met(self, result: RequestResult) -> bool:
        return result.ok and (self.ttft is None or result.ttft <= self.ttft) and \
            (self.tpot is None or result.tpot <= self.tpot)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def summarize(results: list[RequestResult], wall: float, slo: SLO) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    good = [r for r in ok if slo.met(r)]
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": wall,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_s": percentiles([gap for r in ok for gap in r.token_gaps]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "throughput_rps": len(ok) / wall if wall else 0.0,
        "output_tokens_per_s": output / wall if wall else 0.0,
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot},
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "goodput_rps": len(good) / wall if wall else 0.0,
    }


def table(summary: dict) -> str:
    rows = [f"requests {summary['completed']}/{summary['requests']} ok, {summary['errors']} errors, "
            f"{summary['duration_s']:.2f}s"]
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        p = summary[name]
        rows.append(f"{name[:-2].upper():5} p50 {p['p50'] * 1000:9.1f} ms  p90 {p['p90'] * 1000:9.1f} ms  "
                    f"p99 {p['p99'] * 1000:9.1f} ms")
    rows.append(f"throughput {summary['throughput_rps']:.2f} req/s, {summary['output_tokens_per_s']:.1f} tok/s; "
                f"goodput {summary['goodput_rps']:.2f} req/s (SLO attainment {summary['slo_attainment']:.0%})")
    return "\n".join(rows)
