"""`epd profile`: time the real stages of a model on this machine, measure
their peak memory per batch shape (CUDA: the allocator's peak; CPU: the
resident set's), and write the profile JSON that `epd plan --profile` fits its
cost and memory model to."""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

from .peak_memory import PeakMeter, parameter_bytes
from .profile import profile_document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    parser.add_argument("--hardware", default="cpu", help="label recorded in the profile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", default="336x336")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    parser.add_argument("--out", required=True)


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _kv_bytes_per_token(adapter, dtype) -> int:
    """Keys and values of every layer for one token, from the language model's config."""
    text = adapter.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * adapter.num_layers * kv_heads * head_dim * dtype.itemsize


def run(args: argparse.Namespace) -> int:
    from ...workers.engine import KVCacheConfig
    from ...workers.engine.offline import OfflineEngines
    from ...workers.messages import ImageSize, PrefillJob, SamplingParams
    from ...workers.models import EncodeInput, UnknownModelError, load_adapter

    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
        adapter = load_adapter(args.model)
    except (ValueError, UnknownModelError) as exc:
        print(f"epd profile: {exc}", file=sys.stderr)
        return 2
    meter = PeakMeter(args.device)
    before_weights = meter.in_use()
    vision, language = adapter.load_vision(args.device), adapter.load_language(args.device)
    size = ImageSize(width, height)
    tokens_per_image = sum(adapter.image_items(size))
    encode = []
    for images in (1, 2, 4, 8):
        items = [EncodeInput(_png(width, height, seed)) for seed in range(images)]
        seconds = _median_seconds(lambda: vision.encode(items), args.repeats)
        encode.append({"images": images, "patch_tokens": images * tokens_per_image,
                       "megapixels": images * width * height / 1e6, "seconds": seconds,
                       "peak_bytes": meter.peak_above_start(lambda batch=items: vision.encode(batch))})
    # prefix caching off: every timed repeat computes its whole prompt
    engines = OfflineEngines(language, adapter, KVCacheConfig(prefix_cache_bytes=0))
    greedy = SamplingParams(max_tokens=1)
    prefill = []
    for lengths in ([64], [256], [512], [256, 256], [128] * 4):
        def prefill_batch(lengths=lengths) -> None:
            engines.prefill_only([PrefillJob(f"p{i}", [7] * n, [], [], greedy) for i, n in enumerate(lengths)])
        prefill.append({"tokens": lengths, "seconds": _median_seconds(prefill_batch, args.repeats),
                        "peak_bytes": meter.peak_above_start(prefill_batch)})
    decode = []
    for sequences, context in ((1, 128), (4, 128), (8, 256), (16, 512)):
        engines.start_decoding([PrefillJob(f"d{context}.{i}", [7] * context, [], [],
                                           SamplingParams(max_tokens=1000, ignore_eos=True))
                                for i in range(sequences)])
        engines.decode.step()  # the sequences join
        seconds = _median_seconds(engines.decode.step, args.repeats)
        decode.append({"sequences": sequences, "context_tokens": sequences * (context + 2), "seconds": seconds,
                       "peak_bytes": meter.peak_above_start(engines.decode.step)})
        engines.decode.fail_all()  # done with this batch: its blocks go back
    memory = {"method": meter.method, "vision_weight_bytes": parameter_bytes(vision.parts.values()),
              "language_weight_bytes": parameter_bytes(language.parts.values()),
              "runtime_reserve_bytes": meter.runtime_reserve(before_weights),
              "kv_bytes_per_token": _kv_bytes_per_token(adapter, language.dtype)}
    document = profile_document(args.model, args.hardware, encode, prefill, decode, memory)
    Path(args.out).write_text(json.dumps(document, indent=2))
    print(f"wrote {args.out}: {len(encode)} encode, {len(prefill)} prefill, {len(decode)} decode samples; "
          f"memory by {meter.method}")
    return 0
