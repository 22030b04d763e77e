"""Engine benchmark: prefill and decode tokens/s at batch 1, 8 and 32, our paged
engine against the padded engine epd had before (bench/baselines) and Hugging
Face `generate` with a static batch, in the same run, as ratios; and the
structural figures: padding tokens computed per useful token, KV bytes copied
per decode step, KV pool utilisation. In bfloat16 (and in float32 with
`--compile-float32`) our layers are compiled (TorchInductor), so the same
engine with eager layers runs too (`ours_eager`).

    python -m epd.bench.engine [--model small-llava] [--dtype float32] [--compile-float32] --out bench/results/engine.json

Prompts have mixed lengths (100 to 700 tokens, seeded) like a real queue, so
padding costs what it costs in service. Decode runs `--steps` greedy steps after
every sequence has joined."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import torch

from ..workers.engine import KVCacheConfig
from ..workers.engine.compiled import compiles
from ..workers.engine.offline import OfflineEngines
from ..workers.messages import PrefillJob, SamplingParams
from ..workers.models import load_adapter
from .baselines.padded_engine import PaddedEngine
from .report import write_json


def prompts(batch: int, text_ids: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.choice(text_ids) for _ in range(rng.randrange(100, 700))] for _ in range(batch)]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def ours(language, adapter, batch_prompts: list[list[int]], steps: int, repeats: int,
         enforce_eager: bool = False, compile_float32: bool = False) -> dict:
    engines = OfflineEngines(language, adapter, KVCacheConfig(capacity_bytes=1 << 30, prefix_cache_bytes=0),
                             enforce_eager=enforce_eager, compile_float32=compile_float32)

    def jobs(tag: str) -> list[PrefillJob]:
        return [PrefillJob(f"{tag}{i}", ids, [], [], SamplingParams(max_tokens=steps + 8, ignore_eos=True))
                for i, ids in enumerate(batch_prompts)]

    engines.prefill_only(jobs("warm"))
    prefill = median([seconds(lambda r=r: engines.prefill_only(jobs(f"p{r}."))) for r in range(repeats)])
    engines.start_decoding(jobs("d"))
    engines.decode.step()  # every sequence joins
    decode = seconds(lambda: [engines.decode.step() for _ in range(steps)])
    stats, decode_engine = engines.decode.stats, engines.decode
    stored = decode_engine.kv_tokens
    held = decode_engine.blocks_held * decode_engine.block_size
    return {"prefill_tokens_per_s": sum(map(len, batch_prompts)) / prefill,
            "decode_tokens_per_s": len(batch_prompts) * steps / decode,
            "padding_tokens_per_useful_token": 0.0,
            "kv_bytes_copied_per_decode_step": stats.swapped_bytes / max(1, stats.steps),
            "kv_pool_utilisation": stored / held if held else 0.0, "attention": engines.runtime.decoder.attention.name,
            "compiled": engines.runtime.decoder.dense.compiled}


def padded(language, batch_prompts: list[list[int]], steps: int, repeats: int) -> dict:
    engine = PaddedEngine(language)
    engine.prefill(batch_prompts)
    prefill = median([seconds(lambda: engine.prefill(batch_prompts)) for _ in range(repeats)])
    engine.counters = type(engine.counters)()
    first, kv = engine.prefill(batch_prompts)
    decode = seconds(lambda: engine.decode(kv, first, steps))
    counters = engine.counters
    longest = max(map(len, batch_prompts)) + steps
    return {"prefill_tokens_per_s": sum(map(len, batch_prompts)) / prefill,
            "decode_tokens_per_s": len(batch_prompts) * steps / decode,
            "padding_tokens_per_useful_token": counters.padding_tokens / counters.useful_tokens,
            # a batched cache is laid out again whenever a sequence joins or leaves: with one of those per
            # step (a busy server), every step copies the whole cache once
            "kv_bytes_copied_per_decode_step": counters.relayout_bytes,
            "kv_pool_utilisation": sum(len(p) + steps for p in batch_prompts) / (len(batch_prompts) * longest)}


def generate(full, batch_prompts: list[list[int]], steps: int, repeats: int) -> dict:
    width = max(map(len, batch_prompts))
    ids = torch.zeros((len(batch_prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch_prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1

    def run(new: int) -> None:
        full.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, eos_token_id=None)

    run(1)
    first = median([seconds(lambda: run(1)) for _ in range(repeats)])
    whole = seconds(lambda: run(steps + 1))
    return {"prefill_tokens_per_s": sum(map(len, batch_prompts)) / first,
            "decode_tokens_per_s": len(batch_prompts) * steps / max(whole - first, 1e-9),
            "padding_tokens_per_useful_token": float((mask == 0).sum() / mask.sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small-llava")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-float32", action="store_true",
                        help="float32 layers compiled too (the workers' --compile-float32), eager ones beside them")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    adapter = load_adapter(args.model)
    language, full = adapter.load_language(dtype=dtype), adapter.load_full(dtype=dtype)
    # the padded baseline runs the family's own layers (compiled ones give up their projections to fused ones)
    baseline = adapter.load_language(dtype=dtype)
    # compiled layers: the same engine with eager layers beside them (its own copy: eager packs 16-bit weights)
    compiled = compiles(dtype, language.device, enforce_eager=False, compile_float32=args.compile_float32)
    eager = adapter.load_language(dtype=dtype) if compiled else None
    text_ids = [t for t in range(10, int(adapter.text_config.vocab_size)) if t != adapter.image_token_id]
    results = {"model": args.model, "dtype": args.dtype, "compiled": compiled, "torch_threads": torch.get_num_threads(),
               "points": []}
    for batch in (int(b) for b in args.batches.split(",")):
        batch_prompts = prompts(batch, text_ids, seed=batch)
        point: dict[str, Any] = {"batch": batch, "prompt_tokens": sum(map(len, batch_prompts)),
                 "ours": ours(language, adapter, batch_prompts, args.steps, args.repeats,
                              compile_float32=args.compile_float32),
                 "padded": padded(baseline, batch_prompts, args.steps, args.repeats),
                 "generate": generate(full, batch_prompts, args.steps, args.repeats)}
        if eager is not None:
            point["ours_eager"] = ours(eager, adapter, batch_prompts, args.steps, args.repeats, enforce_eager=True)
        point["ratios"] = {f"ours/{other}": {kind: point["ours"][kind] / point[other][kind]
                                             for kind in ("prefill_tokens_per_s", "decode_tokens_per_s")}
                           for other in ("padded", "generate", "ours_eager") if other in point}
        print(json.dumps({k: point[k] for k in ("batch", "ratios")}), flush=True)
        results["points"].append(point)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
