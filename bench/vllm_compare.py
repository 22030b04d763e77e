"""epd against vLLM on this machine, same model, same load, same run.

    python -m epd.bench.vllm_compare --vllm-python /path/to/vllm-venv/bin/python \\
        [--model small-llava] [--rounds 1] --out bench/results/vllm_compare.json

vLLM reads only the hub's checkpoint layout, so the preset is written once in
it (`workers/models/layouts`) and every server loads that same directory. Each
server runs alone on the machine, in turn: vLLM (its OpenAI server, OMP threads
bound to every core), `epd serve` (separate encode, prefill and decode
processes) and `epd serve --colocated`. Each serves the same loads: 4 images of
336x336 with 32-token prompts and 16 output tokens at 2 req/s and at
saturation, and a text-only load at saturation; first, a few greedy requests
check that every server returns the same text. Both run at one precision
(`--precision`): bfloat16 where the CPU computes it natively (AVX-512 BF16,
AMX), float32 elsewhere (AVX2), where bfloat16 matmuls are emulated and run
several times slower (vLLM would still pick bfloat16 for a float32 checkpoint:
0.64 against 1.99 4-image req/s at 2 req/s offered, on an AVX2 EPYC). In float32
epd's layers are compiled too (`--compile-float32`), as vLLM's are. Installing
vLLM's CPU build (it needs its own virtualenv): see the README's benchmark section."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from epd.image_size import ImageSize
from epd.slo import SLO

from ..workers.engine.packed_linear import native_bfloat16
from ..workers.launcher.processes import ProcessGroup, free_port, start_serve
from ..workers.registry import KEY_PREFIX, WorkerInfo
from .report import table, write_json
from .runner import run_workload
from .workload import RequestFactory, WorkloadSpec

if TYPE_CHECKING:
    import torch

NAME = "bench-model"  # the name every server is asked for


def hub_layout_copy(model: str) -> Path:
    """The model directory rewritten with the hub's tensor names (what vLLM loads)."""
    from safetensors.torch import load_file, save_file

    from ..workers.models import load_adapter
    from ..workers.models.layouts import to_hub_names
    from ..workers.models.loading import checkpoint_files

    adapter = load_adapter(model)
    adapter_parts = {**adapter.vision_factories(), **adapter.language_factories()}
    target = Path(tempfile.mkdtemp(prefix=f"{Path(model).name}-hub-"))
    shutil.copytree(adapter.model_dir, target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(adapter.model_dir):
        tensors.update(load_file(str(path)))
    internal = {_internal_name(adapter, name): tensor for name, tensor in tensors.items()}
    assert all(any(name.startswith(p) for p in adapter_parts) for name in internal), "unmapped tensor names"
    save_file({k: v.contiguous() for k, v in to_hub_names(adapter.family, internal).items()},
              target / "model.safetensors")
    return target


def _internal_name(adapter, name: str) -> str:
    for old, new in adapter.checkpoint_renames.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def precision_args(precision: str) -> tuple[list[str], list[str]]:
    """(vLLM's arguments, epd's worker arguments) for running both at `precision`."""
    if precision == "auto":
        precision = "bfloat16" if native_bfloat16() else "float32"
    if precision == "bfloat16":
        return ["--dtype", "bfloat16"], ["--worker-arg=--dtype=bfloat16"]
    return ["--dtype", "float32"], ["--worker-arg=--dtype=float32", "--worker-arg=--compile-float32"]


def start_vllm(python: str, model_dir: Path, threads: str, extra: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": threads, "VLLM_CPU_KVCACHE_SPACE": "4"}
    process = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                "--served-model-name", NAME, "--port", str(port), *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode} during start-up")
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return process, url
        except OSError:
            time.sleep(1)  # polling a condition with a deadline
    process.terminate()
    raise RuntimeError("vLLM did not start within 600s")


async def greedy_texts(url: str, spec: WorkloadSpec, count: int = 4) -> list[str]:
    factory = RequestFactory(replace(spec, model=NAME))
    texts = []
    async with aiohttp.ClientSession() as session:
        for index in range(count):
            body = {**factory.body(index), "stream": False, "temperature": 0}
            body.pop("stream_options", None)
            async with session.post(url + "/chat/completions", json=body) as response:
                texts.append((await response.json())["choices"][0]["message"]["content"])
    return texts


def loads(spec: WorkloadSpec) -> dict[str, tuple[WorkloadSpec, int]]:
    """name -> (workload, concurrency). Each load has its own seed: with one seed, a load's prompts would
    repeat the ones before it (same text, same images), and both servers would serve them from their
    prefix caches."""
    images = replace(spec, images_per_request=4, image_size=ImageSize(336, 336), prompt_tokens=32, max_tokens=16)
    return {"4 images @ 2 req/s": (replace(images, rate=2.0, fixed_rate=True, requests=40, seed=1), 64),
            "4 images @ saturation": (replace(images, rate=0.0, requests=60, seed=2), 32),
            "text only @ saturation": (replace(images, images_per_request=0, rate=0.0, requests=240, seed=3), 64),
            # one request at a time: the latency of the request path itself, with nothing queued beside it
            "4 images, one at a time": (replace(images, rate=0.0, requests=20, seed=4), 1)}


def measure(label: str, url: str, spec: WorkloadSpec, prefill_metrics: Sequence[str] = ()) -> dict:
    result: dict = {"greedy": asyncio.run(greedy_texts(url, spec))}
    for name, (load, concurrency) in loads(spec).items():
        asyncio.run(run_workload(url, replace(load, requests=4, seed=99), SLO(), concurrency, progress=False))
        before = transfer_wait(prefill_metrics)
        summary = asyncio.run(run_workload(url, load, SLO(), concurrency, progress=False))
        if prefill_metrics:  # the share of TTFT spent waiting on the KV handoff after prefill's compute
            waited, count = (a - b for a, b in zip(transfer_wait(prefill_metrics), before, strict=True))
            summary["transfer_wait_mean_s"] = waited / count if count else 0.0
            summary["transfer_share_of_ttft"] = summary["transfer_wait_mean_s"] / summary["ttft_s"]["mean"]
        share = (f"\nKV handoff wait {summary['transfer_wait_mean_s'] * 1e3:.1f} ms per request = "
                 f"{summary['transfer_share_of_ttft']:.1%} of mean TTFT") if prefill_metrics else ""
        print(f"--- {label}: {name}\n{table(summary)}{share}", flush=True)
        result[name] = summary
    return result


def transfer_wait(urls: Sequence[str]) -> tuple[float, float]:
    """Sum and count of epd_transfer_wait_seconds over the prefill workers."""
    total = count = 0.0
    for url in urls:
        for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
            if line.startswith("epd_transfer_wait_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("epd_transfer_wait_seconds_count"):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


def prefill_metric_urls(redis_url: str) -> list[str]:
    import redis

    client = redis.Redis.from_url(redis_url)
    return [WorkerInfo.from_json(raw).metrics_url for raw in client.mget(client.keys(KEY_PREFIX + "prefill:*"))
            if raw]


def ratios(results: dict) -> dict:
    """epd's figures over vLLM's, per load: TTFT p50/p90 (lower is better) and output tokens/s."""
    out: dict = {}
    base = results["vllm"]
    for label in ("epd", "epd --colocated"):
        out[label] = {name: {"ttft_p50": results[label][name]["ttft_s"]["p50"] / base[name]["ttft_s"]["p50"],
                             "ttft_p90": results[label][name]["ttft_s"]["p90"] / base[name]["ttft_s"]["p90"],
                             "output_tokens_per_s": results[label][name]["output_tokens_per_s"]
                             / base[name]["output_tokens_per_s"]}
                      for name in loads(WorkloadSpec(model=NAME))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True, help="python of a virtualenv with vLLM's CPU build")
    parser.add_argument("--model", default="small-llava")
    parser.add_argument("--vllm-threads", default=f"0-{(os.cpu_count() or 1) - 1}",
                        help="VLLM_CPU_OMP_THREADS_BIND (default: every core)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="both servers' precision (auto: bfloat16 where the CPU computes it natively, "
                             "float32 elsewhere, with epd's float32 layers compiled)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    vllm_args, epd_args = precision_args(args.precision)
    model_dir = hub_layout_copy(args.model)
    spec = WorkloadSpec(model=NAME)
    rounds = []
    for round_index in range(args.rounds):
        results = {}
        process, url = start_vllm(args.vllm_python, model_dir, args.vllm_threads, vllm_args)
        try:
            results["vllm"] = measure("vLLM", url, spec)
        finally:
            process.terminate()
            process.wait(60)
        for label, extra in (("epd", ()), ("epd --colocated", ("--colocated",))):
            port = free_port()
            with ProcessGroup(quiet=True) as group:
                child = start_serve(group, str(model_dir), port, "--quiet", "--served-model-name", NAME,
                                    *epd_args, *extra)
                results[label] = measure(label, f"http://127.0.0.1:{port}/v1", spec,
                                         prefill_metric_urls(child.ready_fields["redis"]))
        results["same_greedy_text"] = results["vllm"]["greedy"] == results["epd"]["greedy"] \
            == results["epd --colocated"]["greedy"]
        results["ratios_vs_vllm"] = ratios(results)
        print(f"round {round_index + 1}: same greedy text: {results['same_greedy_text']}\n"
              + json.dumps(results["ratios_vs_vllm"], indent=2), flush=True)
        rounds.append(results)
    write_json(args.out, {"model": args.model, "vllm_args": vllm_args, "epd_args": epd_args, "rounds": rounds})
    shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
