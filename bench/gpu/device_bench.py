"""GPU benchmark of the stage engines at real model shapes, one command:

    python3 bench/gpu/device_bench.py --out results.json

LLaVA-1.5-7B and Qwen2.5-VL-7B shapes with random bf16 weights built on the
device (no downloads). Per model: decode step time at batch 1 / 32 / 128 with
2,048 tokens of context (CUDA graphs and eager) against the bandwidth limit
((weights + KV read) / the HBM traffic a copy achieves in the same run), prefill
tokens/s against the bf16 matmul rate measured in the same run, encode
images/s of the vision tower; and the CUDA-IPC KV handoff of a LLaVA-1.5-7B
request with 4 images (2,400 tokens, 1.2 GB) between two processes, against a
device-to-device copy of the same bytes. Runs from a checkout without
installing it (the device has torch, transformers and Triton)."""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def import_checkout() -> None:
    """Make `epd.workers` importable from this checkout (folders map to `epd.*` as setup.py does)."""
    try:
        import epd.workers  # noqa: F401  (installed)
        return
    except ImportError:
        pass
    boot = Path(tempfile.mkdtemp(prefix="epd-boot-"))
    (boot / "epd").symlink_to(ROOT / "epd")
    sys.path.insert(0, str(boot))
    import epd

    epd.__path__.append(str(ROOT))  # epd.workers -> <checkout>/workers


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` after one warm-up call (CUDA synchronised around each call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ceilings(device: torch.device) -> dict:
    """What this device does in this run: copy bandwidth (bytes read + written) and bf16 matmul rate."""
    size = 2 << 30 if device.type == "cuda" else 64 << 20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(functools.partial(dst.copy_, src), 5, device)
    del src, dst
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_s = timed(lambda: a @ b, 10, device)
    return {"copy_bytes_per_s": 2 * size / copy_s, "bf16_flops": 2 * n ** 3 / mm_s}


# ---- models with random weights ------------------------------------------------------
def model_dir(name: str) -> Path:
    """A model directory holding the real config, a locally built tokenizer and processor, no weights."""
    from epd.workers.models.reference_configs import llava_15_7b, qwen25_vl_7b
    from epd.workers.models.tokenizer import LLAVA_TOKENS, QWEN_TOKENS, build_tokenizer

    target = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    if name == "llava-1.5-7b":
        from transformers import CLIPImageProcessor

        config, tokens = llava_15_7b(), LLAVA_TOKENS
        processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    else:
        from transformers import Qwen2VLImageProcessor

        config, tokens = qwen25_vl_7b(), QWEN_TOKENS
        processor = Qwen2VLImageProcessor()
    build_tokenizer(tokens, target)
    config.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def random_parts(factories, device: torch.device) -> dict:
    from epd.workers.models.loading import build_parts

    parts = build_parts(factories, device, torch.bfloat16)
    with torch.no_grad():
        for module in parts.values():
            for name, param in module.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
    return parts


def load(name: str, device: torch.device):
    from epd.workers.models import load_adapter
    from epd.workers.models.llava import LlavaLanguage, LlavaVision
    from epd.workers.models.qwen2_vl import Qwen2VLLanguage, Qwen2VLVision

    adapter = load_adapter(str(model_dir(name)))
    language_cls, vision_cls = ((LlavaLanguage, LlavaVision) if adapter.family == "llava"
                                else (Qwen2VLLanguage, Qwen2VLVision))
    language = language_cls(adapter, random_parts(adapter.language_factories(), device))
    vision = vision_cls(adapter, random_parts(adapter.vision_factories(), device))
    return adapter, language, vision


def weight_bytes(parts: dict) -> int:
    return sum(p.numel() * p.element_size() for m in parts.values() for p in m.parameters())


# ---- decode ------------------------------------------------------------------------------
def decode_point(adapter, language, batch: int, context: int, ceiling: dict, device: torch.device) -> dict:
    from epd.workers.engine import DecodeEngine, KVCacheConfig, build_runtime
    from epd.workers.engine.forward import kv_layout
    from epd.workers.messages import KVHandoff, SamplingParams

    layout = kv_layout(language, 16)
    tokens = batch * (context + 64)  # room for the ~20 steps this point runs
    needed = layout.bytes_per_token * tokens + (64 << 20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed > free - (6 << 30):
            return {"batch": batch, "context": context,
                    "skipped": f"KV of {needed / 2**30:.1f} GiB does not fit next to the weights "
                               f"({free / 2**30:.1f} GiB free)"}
    runtime = build_runtime(language, KVCacheConfig(capacity_bytes=needed, block_size=16, prefix_cache_bytes=0,
                                                    attention="triton" if device.type == "cuda" else "auto"))
    engine = DecodeEngine(runtime.decoder, adapter, runtime.allocator, max_batch=batch, max_kv_tokens=tokens)
    sampling = SamplingParams(max_tokens=10_000, ignore_eos=True)
    for i in range(batch):
        engine.reserve(f"s{i}", context, 32)
        engine.commit(KVHandoff(f"s{i}", context, 1, context, 0, sampling, b""))
    engine.step()  # the sequences join
    eager = timed(engine.step, 5, device)
    result: dict[str, Any] = {"batch": batch, "context": context, "step_ms_eager": eager * 1e3, "attention": runtime.decoder.attention.name}
    step = eager
    if device.type == "cuda":
        graphs = engine.capture_cuda_graphs(buckets=(batch,))
        step = timed(engine.step, 7, device)
        replay = timed(graphs.graphs[batch].replay, 7, device)  # the forward alone
        result.update({"step_ms_graphs": step * 1e3, "forward_ms_graphs": replay * 1e3})
    weights = weight_bytes(language.parts)
    kv_read = batch * (context + 10) * layout.bytes_per_token
    limit = (weights + kv_read) / ceiling["copy_bytes_per_s"]  # HBM traffic per second, as a copy achieves it
    result.update({"bandwidth_limit_ms": limit * 1e3, "step_fraction_of_limit": limit / step,
                   "weight_gb": weights / 1e9, "kv_read_gb": kv_read / 1e9, "tokens_per_s": batch / step})
    if "forward_ms_graphs" in result:
        result["forward_fraction_of_limit"] = limit / (result["forward_ms_graphs"] / 1e3)
    del engine, runtime
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def agreement_point(language, device: torch.device, batch: int = 8, context: int = 777) -> dict:
    """The paged decode kernel against SDPA on the same random pool: the largest logit difference,
    relative to the logits' spread (the backends must pick the same tokens within tolerance)."""
    from epd.workers.engine import KVCacheConfig, build_runtime
    from epd.workers.engine.attention import SdpaAttention
    from epd.workers.engine.batch import PackedBatch
    from epd.workers.engine.forward import kv_layout

    per_token = kv_layout(language, 16).bytes_per_token
    runtime = build_runtime(language, KVCacheConfig(capacity_bytes=batch * (context + 32) * per_token, block_size=16,
                                                    prefix_cache_bytes=0,
                                                    attention="triton" if device.type == "cuda" else "auto"))
    pool = runtime.pool
    blocks = pool.layout.blocks_for(context + 1)
    pool.kv[:, :, :batch * blocks].normal_()
    logits = {}
    for backend in (runtime.decoder.attention, SdpaAttention(pool, pool.layout.head_dim ** -0.5)):
        runtime.decoder.attention = backend
        packed = PackedBatch(16)
        for b in range(batch):
            packed.add(list(range(b * blocks, (b + 1) * blocks)), context, 1,
                       language.text_positions(context, 1, 0), wants_logits=True)
        tokens = torch.arange(100, 100 + batch, device=device)
        logits[backend.name] = runtime.decoder.forward(language.embed(tokens), packed.finish(device))
    first, second = logits.values()
    spread = float(second.std())
    return {"backends": list(logits), "max_abs_diff_over_std": float((first - second).abs().max()) / spread,
            "same_argmax": bool(torch.equal(first.argmax(-1), second.argmax(-1)))}


# ---- prefill ------------------------------------------------------------------------------
def prefill_point(adapter, language, ceiling: dict, device: torch.device, prompts: int = 16,
                  length: int = 2048) -> dict:
    from epd.workers.engine import KVCacheConfig
    from epd.workers.engine.forward import kv_layout
    from epd.workers.engine.offline import OfflineEngines
    from epd.workers.messages import PrefillJob, SamplingParams

    per_token = kv_layout(language, 16).bytes_per_token
    engines = OfflineEngines(language, adapter, KVCacheConfig(capacity_bytes=prompts * (length + 16) * per_token,
                                                              prefix_cache_bytes=0), token_budget=8192)
    generator = torch.Generator().manual_seed(0)
    top = min(int(adapter.text_config.vocab_size), adapter.image_token_id)  # text ids only

    def run(engines: OfflineEngines = engines) -> None:
        ids = torch.randint(10, top, (prompts, length), generator=generator).tolist()
        engines.prefill_only([PrefillJob(f"p{i}", row, [], [], SamplingParams(max_tokens=1))
                              for i, row in enumerate(ids)])

    seconds = timed(run, 3, device)
    config = adapter.text_config
    matmul_params = weight_bytes(language.parts) / 2 - config.vocab_size * config.hidden_size  # no embedding table
    attention_flops = 2 * config.num_hidden_layers * config.hidden_size * length  # causal QK^T + PV, per token
    flops_per_token = 2 * matmul_params + attention_flops
    achieved = prompts * length * flops_per_token / seconds
    del engines
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens": prompts * length, "tokens_per_s": prompts * length / seconds,
            "flops_per_s": achieved, "fraction_of_matmul_peak": achieved / ceiling["bf16_flops"]}


# ---- encode -------------------------------------------------------------------------------
def encode_point(adapter, vision, device: torch.device, images: int = 32) -> dict:
    if adapter.family == "llava":
        pixels = torch.randn(images, 3, 336, 336, device=device)
        run = lambda: vision.features(pixels)  # noqa: E731
    else:
        patch = adapter.config.vision_config.patch_size
        grid = torch.tensor([[1, 24, 24]] * images)  # 336 x 336 images: 24 x 24 patches of 14
        pixels = torch.randn(images * 24 * 24, 3 * 2 * patch * patch, device=device)
        run = lambda: vision.features(pixels, grid)  # noqa: E731
    seconds = timed(run, 5, device)
    return {"images": images, "image_size": "336x336", "images_per_s": images / seconds}


# ---- CUDA IPC KV handoff ---------------------------------------------------------------------
def _decode_side(connection, shape, dtype_name: str) -> None:
    """The receiving process: a pool in device memory, exported by IPC handle; checks what landed."""
    import_checkout()
    from epd.workers.transport.cuda_ipc import export_handle

    pool = torch.zeros(shape, dtype=getattr(torch, dtype_name), device="cuda")
    connection.send(export_handle(pool))
    blocks = connection.recv()
    torch.cuda.synchronize()
    connection.send(float(pool[:, :, blocks].float().sum()))
    connection.recv()


def ipc_point(device: torch.device, tokens: int = 2400) -> dict:
    from epd.workers.models.reference_configs import llava_15_7b
    from epd.workers.transport.block_copy import BlockCopyPlan, copy_layer
    from epd.workers.transport.cuda_ipc import open_handle

    text = llava_15_7b().text_config
    layers, heads, dim, block = text.num_hidden_layers, text.num_key_value_heads, 128, 16
    count = -(-tokens // block)
    shape = (layers, 2, count * 2, block, heads, dim)
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_decode_side, args=(theirs, shape, "bfloat16"), daemon=True)
    child.start()
    target = open_handle(ours.recv())
    source = torch.randn(shape, dtype=torch.bfloat16, device=device)
    src_blocks = torch.randperm(count * 2)[:count].tolist()
    results = {}
    for label, dst_blocks in (("contiguous", list(range(count))),
                              ("fragmented", torch.randperm(count * 2)[:count].tolist())):
        sources = src_blocks if label == "fragmented" else list(range(count))
        plan = BlockCopyPlan.between(sources, dst_blocks, device)

        def send(plan: BlockCopyPlan = plan) -> int:
            return sum(copy_layer(source, target, layer, plan) for layer in range(layers))

        seconds = timed(send, 5, device)
        results[f"ipc_{label}_bytes_per_s"] = send() / seconds
    ours.send(dst_blocks)
    received = ours.recv()
    expected = float(source[:, :, src_blocks].float().sum())
    ours.send("done")
    child.join(30)
    nbytes = layers * 2 * count * block * heads * dim * 2
    flat_src = source[:, :, :count].contiguous()
    flat_dst = torch.empty_like(flat_src)
    copy_s = timed(lambda: flat_dst.copy_(flat_src), 5, device)
    results.update({"request_tokens": tokens, "request_bytes": nbytes, "d2d_copy_bytes_per_s": nbytes / copy_s,
                    "received_checksum_matches": abs(received - expected) <= 1e-3 * max(1.0, abs(expected))})
    results["ipc_fraction_of_d2d"] = results["ipc_fragmented_bytes_per_s"] / results["d2d_copy_bytes_per_s"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="llava-1.5-7b,qwen2.5-vl-7b")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=16, help="prefill: prompts of --context tokens")
    parser.add_argument("--images", type=int, default=32, help="encode: images per batch")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only smoke-tests the script")
    args = parser.parse_args()
    import_checkout()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"device": name, "torch": torch.__version__}
    report["ceilings"] = ceilings(device)
    print(json.dumps(report["ceilings"]), flush=True)
    if device.type == "cuda":
        report["ipc"] = ipc_point(device)
        print(json.dumps(report["ipc"]), flush=True)
    for name in args.models.split(","):
        adapter, language, vision = load(name, device)
        entry: dict = {"encode": encode_point(adapter, vision, device, args.images)}
        print(name, json.dumps(entry["encode"]), flush=True)
        del vision
        entry["attention_agreement"] = agreement_point(language, device)
        print(name, json.dumps(entry["attention_agreement"]), flush=True)
        entry["prefill"] = prefill_point(adapter, language, report["ceilings"], device, args.prompts, args.context)
        print(name, json.dumps(entry["prefill"]), flush=True)
        entry["decode"] = []
        for batch in (int(b) for b in args.batches.split(",")):
            entry["decode"].append(decode_point(adapter, language, batch, args.context, report["ceilings"], device))
            print(name, json.dumps(entry["decode"][-1]), flush=True)
            Path(args.out).write_text(json.dumps({**report, name: entry}, indent=2))
        report[name] = entry
        del language
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
