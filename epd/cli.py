"""The one `epd` command. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported lazily so
`epd plan` never pays for importing torch."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("epd.workers.launcher.serve_cli", "run encode, prefill, decode workers, Redis and the router on this machine"),
    "worker": ("epd.workers.launcher.worker_cli", "run one stage worker (encode | prefill | decode | colocated)"),
    "router": ("epd.workers.router.cli", "run the OpenAI-compatible HTTP router"),
    "operator": ("epd.operator.cli", "run the Kubernetes operator (kopf)"),
    "plan": ("epd.operator.sizing.plan_cli", "search stage sizes for the most goodput under SLOs"),
    "bench": ("epd.bench.cli", "load-generate against an OpenAI-compatible endpoint"),
    "profile": ("epd.workers.profiling.cli", "time the real stages of a model and write a performance profile"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd", description="epd-serve: Encode-Prefill-Decode disaggregated serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"epd {name}", description=help_text)
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
