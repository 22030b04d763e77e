"""Summaries of a benchmark run: percentiles, throughput, goodput under SLOs."""

from __future__ import annotations

import json
from pathlib import Path

from epd.percentiles import distribution
from epd.slo import SLO

from .client import RequestResult


def summarize(results: list[RequestResult], wall: float, slo: SLO) -> dict:
    """Latency distributions (epd.percentiles), throughput and goodput: completed requests within `slo`."""
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    good = [r for r in ok if slo.met(r.ttft, r.tpot)]
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": wall,
        "ttft_s": distribution([r.ttft for r in ok]),
        "tpot_s": distribution([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_s": distribution([gap for r in ok for gap in r.token_gaps]),
        "e2e_s": distribution([r.e2e for r in ok]),
        "throughput_rps": len(ok) / wall if wall else 0.0,
        "output_tokens_per_s": output / wall if wall else 0.0,
        "slo": slo.to_json(),
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


def write_json(path: str | Path, result: object) -> None:
    """Write a benchmark's result as JSON (its folder made if needed) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
