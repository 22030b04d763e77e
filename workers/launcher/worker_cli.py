"""`epd worker`: run one stage worker (or all stages colocated in one process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import fields

from ..engine import ATTENTION_BACKENDS
from ..models import UnknownModelError, download
from ..redis_connection import add_redis_argument, redis_url
from ..security.tls import add_tls_arguments, tls_from_args
from ..stages.worker import DTYPES, ROLES, WorkerConfig, serve_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    add_redis_argument(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    parser.add_argument("--advertise", default="", help="address other workers use to reach this one")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = any free port)")
    parser.add_argument("--device", default="cpu")
    defaults = {f.name: f.default for f in fields(WorkerConfig)}
    for name in ("encode_max_batch", "encode_max_wait", "prefill_token_budget", "decode_max_batch",
                 "decode_max_kv_tokens", "cache_bytes", "cache_ttl", "kv_cache_bytes", "gpu_memory_utilization",
                 "block_size", "prefix_cache_bytes"):
        parser.add_argument("--" + name.replace("_", "-"), type=type(defaults[name]), default=defaults[name])
    parser.add_argument("--step-token-budget", type=int, default=defaults["step_token_budget"],
                        help="colocated: tokens per step, the running sequences' next tokens first and prefill "
                             "chunks in the rest (as vLLM's --max-num-batched-tokens); bounds how long one "
                             "prompt's prefill holds decoding back (must exceed --decode-max-batch)")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=defaults["attention_backend"])
    parser.add_argument("--dtype", choices=DTYPES, default=defaults["dtype"],
                        help="weights and KV cache: the checkpoint's (auto; exact against its reference), or "
                             "bfloat16 (AMX / tensor cores: much faster, as vLLM runs float32 checkpoints)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no graph capture or compilation: on CUDA, decode steps without CUDA graphs (captured "
                             "at start otherwise); on CPU with 16-bit weights, the layers without TorchInductor "
                             "(compiled at start otherwise)")
    parser.add_argument("--compile-float32", action="store_true",
                        help="on CPU, compile float32 layers too, on weights in oneDNN's blocked layout: 1.3-1.6x "
                             "faster decode steps where the CPU lacks native bfloat16 (AVX2); outputs may then "
                             "differ from generate's in the last bits, so greedy tokens can differ at near-ties")
    parser.add_argument("--kv-paths", default=defaults["kv_paths"],
                        help="KV transfer paths this worker may use, best first among those both ends allow "
                             "(grpc is always kept as the fallback)")
    parser.add_argument("--kv-tcp-port", type=int, default=defaults["kv_tcp_port"],
                        help="decode: port of the tcp KV path, on --host (0: any free port; a pod names a fixed "
                             "one that its NetworkPolicy opens to prefill)")
    add_tls_arguments(parser)
    parser.add_argument("--grpc-reflection", action="store_true", help="serve gRPC reflection (off by default)")
    parser.add_argument("--health-port", type=int, default=0,
                        help="also serve gRPC health alone, without TLS, on this port (for kubelet probes)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads for this worker's model (0: torch's default, one per core); "
                             "processes that share a machine should split its cores")
    parser.add_argument("--small-step-tokens", type=int, default=defaults["small_step_tokens"],
                        help="CPU: forwards of at most this many tokens (small decode batches) run on one thread, "
                             "which a preempted second thread cannot stall (0: every forward on all threads)")
    parser.add_argument("--drain-timeout", type=float, default=defaults["drain_timeout"],
                        help="on SIGTERM, seconds to finish held requests after leaving discovery "
                             "(keep it below the pod's terminationGracePeriodSeconds)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for name in ("torch_threads", "small_step_tokens"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        args.redis_url, args.tls = redis_url(args.redis_url), tls_from_args(args)
        download.prepare(args.model, args.role)  # a hub model with EPD_MODEL_DOWNLOAD=1: this stage's shards
        config = WorkerConfig(**{f.name: getattr(args, f.name) for f in fields(WorkerConfig)})
        asyncio.run(serve_worker(config))
    except (UnknownModelError, ValueError) as exc:
        print(f"epd worker: {exc}", file=sys.stderr)
        return 2
    return 0
