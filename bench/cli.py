"""`epd bench`: a load generator for any OpenAI-compatible chat endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import urllib.request

from epd.image_size import image_size_argument
from epd.slo import SLO

from .report import table, write_json
from .runner import run_workload
from .workload import WorkloadSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""),
                        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    parser.add_argument("--model", default="", help="model name (default: the first of GET /models)")
    parser.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0 = all at once)")
    parser.add_argument("--fixed-rate", action="store_true", help="evenly spaced arrivals instead of Poisson")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds of arrivals (overrides --requests)")
    parser.add_argument("--concurrency", type=int, default=64, help="cap on requests in flight")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-size", type=image_size_argument, default="336x336", help="WIDTHxHEIGHT")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="words of text per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat-images", action="store_true", help="send the same images every time (cache hits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ttft", type=float, default=math.inf, help="TTFT target in seconds (default: none)")
    parser.add_argument("--slo-tpot", type=float, default=math.inf, help="TPOT target in seconds (default: none)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", required=True, help="write the JSON summary here")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        model = args.model or _first_model(args.base_url, args.api_key)
        spec = WorkloadSpec(model=model, requests=args.requests, duration=args.duration, rate=args.rate,
                            fixed_rate=args.fixed_rate, images_per_request=args.images_per_request,
                            image_size=args.image_size, prompt_tokens=args.prompt_tokens,
                            max_tokens=args.max_tokens, repeat_images=args.repeat_images, seed=args.seed)
        if args.concurrency <= 0:
            raise ValueError("--concurrency must be > 0")
        slo = SLO(args.slo_ttft, args.slo_tpot)
    except (ValueError, OSError) as exc:
        print(f"epd bench: {exc}", file=sys.stderr)
        return 2
    summary = asyncio.run(run_workload(args.base_url.rstrip("/"), spec, slo,
                                       args.concurrency, args.timeout, progress=not args.no_progress,
                                       api_key=args.api_key))
    print(table(summary))
    write_json(args.out, summary)
    return 0 if summary["completed"] else 1


def _first_model(base_url: str, api_key: str) -> str:
    request = urllib.request.Request(base_url.rstrip("/") + "/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"][0]["id"]
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"cannot list models at {base_url}: {exc}") from exc
