"""`epd serve`: the whole pipeline on one machine — redis-server (unless
--redis-url), N encode, N prefill and N decode workers (or one colocated
worker), and the router; ready once GET /health answers 200."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from .processes import ProcessGroup, epd_command, free_port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--encode", type=int, default=1, help="encode workers")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--colocated", action="store_true",
                        help="one process runs all stages on one model (no disaggregation), for comparison")
    parser.add_argument("--redis-url", default="", help="use this Redis instead of starting redis-server")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="extra argument passed to every worker (repeatable), e.g. --worker-arg=--encode-max-batch=32")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="extra argument passed to the router (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the children's logs")


def run(args: argparse.Namespace) -> int:
    counts = {"encode": args.encode, "prefill": args.prefill, "decode": args.decode}
    if not args.colocated and min(counts.values()) < 1:
        print("epd serve: --encode, --prefill and --decode must each be >= 1", file=sys.stderr)
        return 2
    group = ProcessGroup(quiet=args.quiet)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        redis_url = args.redis_url or _start_redis(group)
        roles = [("colocated", 1)] if args.colocated else list(counts.items())
        workers = [group.start(f"{role}-{i}", epd_command("worker", "--role", role, "--model", args.model,
                                                          "--redis-url", redis_url, *args.worker_arg),
                               "EPD_WORKER_READY")
                   for role, n in roles for i in range(n)]
        group.wait_ready(workers, args.startup_timeout)
        router = group.start("router", epd_command("router", "--model", args.model, "--redis-url", redis_url,
                                                   "--host", args.host, "--port", str(args.port), *args.router_arg),
                             "EPD_ROUTER_READY")
        group.wait_ready([router], args.startup_timeout)
        endpoint = f"http://{args.host}:{args.port}"
        _wait_healthy(endpoint, group, args.startup_timeout)
        print(f"EPD_SERVE_READY {endpoint}/v1 (model {args.model}, "
              + ("colocated" if args.colocated else f"{args.encode}E{args.prefill}P{args.decode}D") + ")",
              flush=True)
        reported: set[str] = set()
        while not stop.wait(0.5):
            for child in group.dead():
                if child.name not in reported:
                    reported.add(child.name)
                    print(f"epd serve: {child.name} exited with code {child.process.returncode}", file=sys.stderr)
            lost = _lost_roles(group)
            if lost:
                print(f"epd serve: no live {', '.join(lost)} left; shutting down", file=sys.stderr)
                return 1
        return 0
    except RuntimeError as exc:
        print(f"epd serve: {exc}", file=sys.stderr)
        return 1
    finally:
        group.stop()


def _lost_roles(group: ProcessGroup) -> list[str]:
    """Roles (and the router / redis) with no process left alive: serving cannot go on."""
    alive = {c.name.rsplit("-", 1)[0] for c in group.children if c.process.poll() is None}
    needed = {c.name.rsplit("-", 1)[0] for c in group.children}
    return sorted(needed - alive)


def _start_redis(group: ProcessGroup) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: install it (apt-get install redis-server) or pass --redis-url")
    port = free_port()
    child = group.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], "Ready to accept connections")
    group.wait_ready([child], 30)
    return f"redis://127.0.0.1:{port}/0"


def _wait_healthy(endpoint: str, group: ProcessGroup, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = group.first_dead()
        if dead is not None:
            raise RuntimeError(f"{dead.name} exited with code {dead.process.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"{endpoint}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)  # polling a condition with a deadline
    raise RuntimeError(f"router at {endpoint} did not report healthy within {timeout:.0f}s")
