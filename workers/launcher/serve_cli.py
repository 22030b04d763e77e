"""`epd serve`: the whole pipeline on one machine — redis-server (unless
--redis-url), N encode, N prefill and N decode workers (or one colocated
worker), and the router; ready once GET /health answers 200.

It supervises them like a pod's restart policy would: a child that dies is
started again (Redis on its own port, so nothing needs reconfiguring; the
workers keep serving from what they know meanwhile and re-register), with
back-off, and `epd serve` gives up only on a crash loop. Everything binds
loopback; `--tls` adds mutual TLS between the stages with a throwaway CA."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..redis_connection import REDIS_URL_ENV
from .processes import QUICK_EXIT, ProcessGroup, epd_command, free_port

MAX_QUICK_EXITS = 5  # a child that dies this many times in a row soon after starting is not restarted again


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    parser.add_argument("--served-model-name", default="",
                        help="the model id clients use and /v1/models reports (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--router-metrics-port", type=int, default=0,
                        help="the router's /metrics port (0 = any free port; printed when ready)")
    parser.add_argument("--encode", type=int, default=1, help="encode workers")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--colocated", action="store_true",
                        help="one process runs all stages on one model (no disaggregation), for comparison")
    parser.add_argument("--redis-url", default="", help="use this Redis instead of starting redis-server")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS between router and workers, with a CA made for this run")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="torch threads per worker process (0: the machine's cores split evenly among them, "
                             "so that co-located workers do not oversubscribe the CPU)")
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
    if args.worker_threads < 0:
        print(f"epd serve: --worker-threads must be >= 0, got {args.worker_threads}", file=sys.stderr)
        return 2
    group = ProcessGroup(quiet=args.quiet)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="epd-serve-") as scratch:
        try:
            own_redis = "" if args.redis_url else _start_redis(group)
            env = {REDIS_URL_ENV: args.redis_url or own_redis}  # kept off the command lines
            tls = _tls_arguments(Path(scratch)) if args.tls else []
            roles = [("colocated", 1)] if args.colocated else list(counts.items())
            threads = ["--torch-threads", str(args.worker_threads or threads_each(sum(n for _, n in roles)))]
            workers = [group.start(f"{role}-{i}", epd_command("worker", "--role", role, "--model", args.model,
                                                              *tls, *threads, *args.worker_arg),
                                   "EPD_WORKER_READY", env)
                       for role, n in roles for i in range(n)]
            group.wait_ready(workers, args.startup_timeout)
            router = group.start("router", epd_command(
                "router", "--model", args.model, "--host", args.host, "--port", str(args.port),
                "--metrics-port", str(args.router_metrics_port), *tls,
                *(("--served-model-name", args.served_model_name) if args.served_model_name else ()),
                *args.router_arg), "EPD_ROUTER_READY", env)
            group.wait_ready([router], args.startup_timeout)
            endpoint = f"http://{args.host}:{args.port}"
            _wait_healthy(endpoint, group, args.startup_timeout)
            metrics_url = router.ready_line.rsplit("metrics=", 1)[-1]
            shape = "colocated" if args.colocated else f"{args.encode}E{args.prefill}P{args.decode}D"
            print(f"EPD_SERVE_READY {endpoint}/v1 (model {args.model}, {shape}{', mTLS' if tls else ''}) "
                  f"router-metrics={metrics_url}" + (f" redis={own_redis}" if own_redis else ""), flush=True)
            return _supervise(group, stop)
        except RuntimeError as exc:
            print(f"epd serve: {exc}", file=sys.stderr)
            return 1
        finally:
            group.stop()


def _supervise(group: ProcessGroup, stop: threading.Event) -> int:
    """Restart children that die, until stopped; 1 if one is caught in a crash loop."""
    due: dict[str, float] = {}  # child name -> when to restart it
    while not stop.wait(0.5):
        now = time.monotonic()
        for child in group.dead():
            if child.name not in due:
                quick = now - child.started < QUICK_EXIT
                if quick and child.quick_exits + 1 >= MAX_QUICK_EXITS:
                    print(f"epd serve: {child.name} keeps exiting (code {child.process.returncode}); giving up",
                          file=sys.stderr)
                    return 1
                due[child.name] = now + (min(10.0, 0.5 * 2 ** child.quick_exits) if quick else 0.0)
                print(f"epd serve: {child.name} exited with code {child.process.returncode}; restarting",
                      file=sys.stderr, flush=True)
            if now >= due[child.name]:
                del due[child.name]
                group.restart(child)
    return 0


def threads_each(workers: int) -> int:
    """The cores this process may use, split evenly among `workers` processes (at least one each)."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _tls_arguments(directory: Path) -> list[str]:
    from ..security.certs import CertificateAuthority

    files = CertificateAuthority.create(directory).issue(directory, "epd-serve")
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


def _start_redis(group: ProcessGroup) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: install it (apt-get install redis-server) or pass --redis-url")
    port = free_port()
    child = group.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], "Ready to accept connections", stop_last=True)
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

