"""Same-run comparisons for the data plane, written as one JSON:

* multimodal cache: TTFT of requests whose 4 images are cached vs new images,
  with the prefill prefix KV cache on (default) and off (embedding cache only);
* EPD (separate encode, prefill, decode processes) vs `--colocated` (one
  process, no disaggregation) on the same load: the colocated worker with the
  machine's cores (what `epd serve --colocated` gives it), and with as many
  threads as each EPD worker gets (the same compute per stage, so what is
  left between the two is the price of the hops and transfers).

Usage: python -m epd.bench.compare [--model small-llava] --out bench/results/compare.json"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from epd.image_size import image_size_argument
from epd.slo import SLO

from ..workers.launcher.processes import ProcessGroup, free_port, start_serve
from ..workers.launcher.serve_cli import threads_each
from .report import table, write_json
from .runner import run_workload
from .workload import WorkloadSpec


@contextmanager
def serving(model: str, *extra: str) -> Iterator[str]:
    """`epd serve` for the length of the block; its base URL."""
    port = free_port()
    with ProcessGroup(quiet=True) as group:
        start_serve(group, model, port, "--quiet", *extra)
        yield f"http://127.0.0.1:{port}/v1"


def measure(base_url: str, spec: WorkloadSpec, label: str) -> dict:
    summary = asyncio.run(run_workload(base_url, spec, SLO(), concurrency=16, progress=False))
    print(f"--- {label}\n{table(summary)}", flush=True)
    return summary


def cache_runs(model: str, base: WorkloadSpec, *extra: str) -> tuple[dict, dict]:
    """On one EPD server: new images (misses), then the same images again (hits)."""
    label = "EPD" + (f" {' '.join(extra)}" if extra else "")
    with serving(model, *extra) as url:
        measure(url, replace(base, requests=4, seed=99), "warm-up")
        miss = measure(url, replace(base, seed=1), f"{label}, new images (cache misses)")
        measure(url, replace(base, requests=1, repeat_images=True, seed=2), "prime the cache")
        hit = measure(url, replace(base, repeat_images=True, seed=2), f"{label}, repeated images (cache hits)")
    return miss, hit


def colocated_run(model: str, base: WorkloadSpec, *extra: str) -> dict:
    with serving(model, "--colocated", *extra) as url:
        measure(url, replace(base, requests=4, seed=99), "warm-up")
        return measure(url, replace(base, seed=1), f"colocated{' ' + ' '.join(extra) if extra else ''}, new images")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def versus(epd: dict, colocated: dict) -> dict:
    return {"epd": epd, "colocated": colocated,
            "ttft_p50_epd_over_colocated": ratio(epd["ttft_s"]["p50"], colocated["ttft_s"]["p50"]),
            "ttft_p90_epd_over_colocated": ratio(epd["ttft_s"]["p90"], colocated["ttft_s"]["p90"]),
            "throughput_epd_over_colocated": ratio(epd["throughput_rps"], colocated["throughput_rps"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-llava")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--image-size", type=image_size_argument, default="336x336")
    parser.add_argument("--out", default="bench/results/compare.json")
    args = parser.parse_args()
    base = WorkloadSpec(model=args.model, requests=args.requests, rate=args.rate, fixed_rate=True,
                        images_per_request=4, image_size=args.image_size, prompt_tokens=32, max_tokens=16)
    workload = {**base.__dict__, "image_size": [args.image_size.width, args.image_size.height]}
    results: dict = {"model": args.model, "workload": workload}

    miss, hit = cache_runs(args.model, base)
    # the same with the prefill prefix KV cache off: what the embedding cache alone saves
    miss_no_prefix, hit_no_prefix = cache_runs(args.model, base, "--worker-arg=--prefix-cache-bytes=0")
    colocated = colocated_run(args.model, base)
    per_stage = threads_each(3)  # what `epd serve` gives each of EPD's three workers
    colocated_per_stage = colocated_run(args.model, base, f"--worker-threads={per_stage}")

    results["cache"] = {"miss": miss, "hit": hit,
                        "ttft_p50_hit_over_miss": ratio(hit["ttft_s"]["p50"], miss["ttft_s"]["p50"]),
                        "ttft_p90_hit_over_miss": ratio(hit["ttft_s"]["p90"], miss["ttft_s"]["p90"]),
                        "embedding_cache_only": {
                            "miss": miss_no_prefix, "hit": hit_no_prefix,
                            "ttft_p50_hit_over_miss": ratio(hit_no_prefix["ttft_s"]["p50"],
                                                            miss_no_prefix["ttft_s"]["p50"])}}
    results["epd_vs_colocated"] = versus(miss, colocated)
    results["epd_vs_colocated_same_threads"] = {"threads": per_stage, **versus(miss, colocated_per_stage)}
    write_json(args.out, results)
    print(json.dumps({k: v for k, v in results["cache"].items() if "over" in k}
                     | {"ttft_p50_hit_over_miss_embedding_cache_only":
                        results["cache"]["embedding_cache_only"]["ttft_p50_hit_over_miss"]}
                     | {k: v for k, v in results["epd_vs_colocated"].items() if "over" in k}
                     | {f"{k}_same_threads": v for k, v in results["epd_vs_colocated_same_threads"].items()
                        if "over" in k}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
