"""`epd plan`: the serving mode and sizes with the most goodput within the SLOs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml
from tqdm import tqdm

from epd.image_size import image_size_argument
from epd.slo import SLO

from .architectures import ARCHITECTURES, get_architecture
from .explain import bound, breakdown, plan_name, statement
from .hardware import HARDWARE, get_hardware
from .memory import ATTENTION_KINDS
from .perfmodel import roofline
from .planner import MINIMUM_GPUS, Planner, Recommendation, check_fits, deployment_manifest
from .profile import load_profile
from .simulator import MODES
from .workload import WorkloadMix, load_trace, poisson


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"one of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--hardware", default="a100-80gb", help=f"one of {', '.join(HARDWARE)}")
    parser.add_argument("--gpus", type=int, required=True, help="GPU budget")
    parser.add_argument("--slo-ttft", type=float, required=True, help="TTFT target (s)")
    parser.add_argument("--slo-tpot", type=float, required=True, help="TPOT target (s)")
    parser.add_argument("--slo-percentile", type=int, default=SLO.percentile,
                        help="the share of requests (%%) that must meet the targets")
    parser.add_argument("--trace", default="", help="JSON-lines trace to replay instead of a Poisson workload")
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate of the base workload")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--image-size", type=image_size_argument, default="1024x1024")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per request")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--mode", choices=("any", *MODES), default="any",
                        help="plan for one serving mode only (default: recommend the best of all)")
    parser.add_argument("--target-rate", type=float, default=0.0,
                        help="instead of the most goodput, the fewest GPUs reaching this rate")
    parser.add_argument("--profile", default="", help="an `epd profile` JSON to use instead of the roofline")
    parser.add_argument("--vision-attention", choices=ATTENTION_KINDS, default="flash",
                        help="the vision tower's attention kernel, for its activation memory (roofline only)")
    parser.add_argument("--explain", action="store_true", help="print the chosen plan's per-stage time and memory")
    parser.add_argument("--name", default="epd", help="metadata.name of the printed EPDDeployment")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        arch, hw = get_architecture(args.model), get_hardware(args.hardware)
        slo = SLO(args.slo_ttft, args.slo_tpot, args.slo_percentile)
        model = load_profile(args.profile, arch, hw) if args.profile else roofline(arch, hw, args.vision_attention)
        check_fits(model, args.gpus)
        if args.mode != "any" and args.gpus < MINIMUM_GPUS[args.mode]:
            raise ValueError(f"GPU budget {args.gpus} is too small for {args.mode}: it needs {MINIMUM_GPUS[args.mode]}")
        requests = load_trace(args.trace) if args.trace else poisson(args.rate, args.requests, _mix(args), args.seed)
        with tqdm(desc="simulated plans", unit="plan", file=sys.stderr, disable=args.format == "json" and
                  not sys.stderr.isatty()) as bar:
            planner = Planner(model, requests, slo, progress=bar.update)
            recommendation = _search(planner, args)
    except (ValueError, OSError) as exc:
        print(f"epd plan: {exc}", file=sys.stderr)
        return 2
    best = recommendation.best
    manifest = deployment_manifest(best, args.model, slo, args.name) if best.config.mode == "epd" else None
    plans = {mode: {**plan.as_dict(), "bound": bound(plan, slo)} for mode, plan in recommendation.by_mode.items()}
    result: dict[str, Any] = {"model": arch.name, "hardware": hw.name, "gpus": best.config.gpus,
              "slo": slo.to_json(), "performance_model": model.source,
              "evaluations": planner.evaluations, "recommended_mode": best.config.mode,
              "plan": plans[best.config.mode], "plans": plans, "statement": statement(recommendation),
              "epddeployment": manifest}
    if args.explain:
        result["explain"] = {k: best.summary[k] for k in ("stages", "phases_s", "limits") if k in best.summary}
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return 0
    print(f"{arch.name} on {best.config.gpus}x {hw.name}, SLO TTFT {slo.ttft_seconds}s / TPOT {slo.tpot_seconds}s "
          f"(attainment >= {slo.percentile}%), {model.source} model")
    print(f"{'plan':<22}{'goodput req/s':>15}{'attainment':>12}{'TTFT p90':>10}{'TPOT p90':>10}  bound by")
    for mode, plan in recommendation.by_mode.items():
        d = plans[mode]
        print(f"{plan_name(plan):<22}{d['goodput_rps']:>15.3f}{d['slo_attainment']:>12.1%}{d['ttft_p90_s']:>10.2f}"
              f"{d['tpot_p90_s']:>10.3f}  {d['bound']}")
    print("\n" + result["statement"])
    if args.explain:
        print("\n" + "\n".join(breakdown(best)))
    if manifest is not None:
        print("\n# kubectl apply -f -\n" + yaml.safe_dump(manifest, sort_keys=False))
    return 0


def _mix(args: argparse.Namespace) -> WorkloadMix:
    return WorkloadMix(args.images_per_request, args.image_size, args.prompt_tokens, args.output_tokens)


def _search(planner: Planner, args: argparse.Namespace) -> Recommendation:
    if args.target_rate:
        return planner.fewest_gpus(args.target_rate, args.gpus, None if args.mode == "any" else args.mode)
    if args.mode == "any":
        return planner.recommend(args.gpus)
    plan = planner.best(args.mode, args.gpus)
    return Recommendation(plan, {args.mode: plan})
