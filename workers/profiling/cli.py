"""`epd profile`: time the real stages of a model on this machine, measure
their peak memory per batch shape (CUDA: the allocator's peak; CPU: the
resident set's), and write the profile JSON that `epd plan --profile` fits its
cost and memory model to."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from epd.image_size import image_size_argument
from epd.operator.sizing.profile import profile_document
from epd.synthetic_images import noise_png

from .peak_memory import PeakMeter, parameter_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    parser.add_argument("--hardware", default="cpu", help="label recorded in the profile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=image_size_argument, default="336x336")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    parser.add_argument("--out", required=True)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median_low(times)


def run(args: argparse.Namespace) -> int:
    from ..engine import KVCacheConfig
    from ..engine.forward import kv_layout
    from ..engine.offline import OfflineEngines
    from ..messages import PrefillJob, SamplingParams
    from ..models import EncodeInput, UnknownModelError, load_adapter

    try:
        adapter = load_adapter(args.model)
    except (ValueError, UnknownModelError) as exc:
        print(f"epd profile: {exc}", file=sys.stderr)
        return 2
    meter = PeakMeter(args.device)
    before_weights = meter.in_use()
    vision, language = adapter.load_vision(args.device), adapter.load_language(args.device)
    size = args.image_size
    width, height = size.width, size.height
    tokens_per_image = sum(adapter.image_items(size))
    encode = []
    for images in (1, 2, 4, 8):
        items = [EncodeInput(noise_png(width, height, seed)) for seed in range(images)]
        def encode_batch(batch: list[EncodeInput] = items) -> None:
            vision.encode(batch)

        encode.append({"images": images, "patch_tokens": images * tokens_per_image,
                       "megapixels": images * width * height / 1e6,
                       "seconds": _median_seconds(encode_batch, args.repeats),
                       "peak_bytes": meter.peak_above_start(encode_batch)})
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
              "kv_bytes_per_token": kv_layout(language, engines.prefill.block_size).bytes_per_token}
    document = profile_document(args.model, args.hardware, encode, prefill, decode, memory)
    Path(args.out).write_text(json.dumps(document, indent=2))
    print(f"wrote {args.out}: {len(encode)} encode, {len(prefill)} prefill, {len(decode)} decode samples; "
          f"memory by {meter.method}")
    return 0
