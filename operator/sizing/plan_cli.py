"""`epd plan`: pick stage sizes for the most goodput within the SLOs."""

from __future__ import annotations

import argparse
import json
import sys

import yaml
from tqdm import tqdm

from .architectures import ARCHITECTURES, get_architecture
from .hardware import HARDWARE, get_hardware
from .perfmodel import load_profile, roofline
from .planner import Planner, check_fits, deployment_manifest
from .results import SLO
from .workload import WorkloadMix, load_trace, poisson


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"one of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--hardware", default="a100-80gb", help=f"one of {', '.join(HARDWARE)}")
    parser.add_argument("--gpus", type=int, required=True, help="GPU budget")
    parser.add_argument("--slo-ttft", type=float, required=True, help="TTFT target (s)")
    parser.add_argument("--slo-tpot", type=float, required=True, help="TPOT target (s)")
    parser.add_argument("--trace", default="", help="JSON-lines trace to replay instead of a Poisson workload")
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate of the base workload")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--image-size", default="1024x1024")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per request")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--target-rate", type=float, default=0.0,
                        help="instead of the most goodput, the fewest GPUs reaching this rate")
    parser.add_argument("--profile", default="", help="an `epd profile` JSON to use instead of the roofline")
    parser.add_argument("--name", default="epd", help="metadata.name of the printed EPDDeployment")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        arch, hw = get_architecture(args.model), get_hardware(args.hardware)
        slo = SLO(args.slo_ttft, args.slo_tpot)
        model = load_profile(args.profile, arch, hw) if args.profile else roofline(arch, hw)
        check_fits(model, args.gpus)
        if args.trace:
            requests = load_trace(args.trace)
        else:
            width, height = (int(v) for v in args.image_size.lower().split("x"))
            mix = WorkloadMix(args.images_per_request, (width, height), args.prompt_tokens, args.output_tokens)
            requests = poisson(args.rate, args.requests, mix, args.seed)
        with tqdm(desc="simulated plans", unit="plan", file=sys.stderr, disable=args.format == "json" and
                  not sys.stderr.isatty()) as bar:
            planner = Planner(model, requests, slo, progress=bar.update)
            best = planner.fewest_gpus(args.target_rate, args.gpus) if args.target_rate else planner.best_epd(args.gpus)
            gpus = best.config.gpus
            bundled = planner.best_bundled(gpus)
            colocated = planner.best_colocated(gpus)
    except (ValueError, OSError) as exc:
        print(f"epd plan: {exc}", file=sys.stderr)
        return 2
    manifest = deployment_manifest(best, args.model, slo, args.name)
    result = {"model": arch.name, "hardware": hw.name, "gpus": gpus, "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot},
              "performance_model": model.source, "evaluations": planner.evaluations,
              "plan": best.as_dict(), "bundled": bundled.as_dict(), "colocated": colocated.as_dict(),
              "epddeployment": manifest}
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return 0
    print(f"{arch.name} on {gpus}x {hw.name}, SLO TTFT {slo.ttft}s / TPOT {slo.tpot}s (p90 attainment >= 90%)")
    print(f"{'plan':<22}{'goodput req/s':>15}{'attainment':>12}{'TTFT p90':>10}{'TPOT p90':>10}")
    for label, plan in (("EPD " + best.config.label(), best), ("bundled " + bundled.config.label(), bundled),
                        ("colocated " + colocated.config.label(), colocated)):
        d = plan.as_dict()
        print(f"{label:<22}{d['goodput_rps']:>15.3f}{d['slo_attainment']:>12.1%}{d['ttft_p90_s']:>10.2f}"
              f"{d['tpot_p90_s']:>10.3f}")
    print("\n# kubectl apply -f -\n" + yaml.safe_dump(manifest, sort_keys=False))
    return 0
