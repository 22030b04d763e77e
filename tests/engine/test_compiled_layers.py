"""The decoder layers' dense parts compiled by TorchInductor (CPU, 16-bit weights):
compiled before any request, one graph for every batch (no recompiles under
load; once warm, calls that skip Dynamo's guards run the graphs the guards
would have picked), the same logits as the eager layers within bfloat16's rounding, and off
for float32 (unless `--compile-float32`: then within float32's) and with `--enforce-eager`; their projections fused (queries, keys
and values as one matmul, gate and up as another), the weights held once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from epd.workers.engine import EngineRuntime, KVCacheConfig, build_runtime
from epd.workers.engine.batch import PackedBatch
from epd.workers.engine.compiled import compiles
from epd.workers.engine.fused_layer import FusedLayer, joined
from epd.workers.engine.packed_linear import PackedLinear, packs
from epd.workers.engine.step_threads import StepThreads
from epd.workers.models import EncodeInput, load_adapter

from ..helpers import png_bytes, worker_from_command_line

SIZES = (3, 1, 17, 40)  # prompts of these lengths, packed into one forward


def packed_logits(runtime: EngineRuntime, vocab: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Next-token logits of prompts of these lengths (seeded random ids) packed into one forward."""
    language = runtime.decoder.language
    generator = torch.Generator().manual_seed(len(sizes))
    batch, embeds = PackedBatch(4), []
    for length in sizes:
        batch.add(runtime.allocator.allocate(-(-length // 4)), 0, length,
                  language.text_positions_of(list(range(length))), wants_logits=True)
        embeds.append(language.embed(torch.randint(10, vocab, (length,), generator=generator)))
    logits: torch.Tensor = runtime.decoder.forward(torch.cat(embeds), batch.finish(language.device))
    runtime.allocator.free_blocks([block for seq in batch.sequences for block in seq.block_table])
    return logits


def warm_logits(runtime: EngineRuntime, vocab: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """`packed_logits` with Dynamo's guards checked, asserting that no graph is compiled (warm-up made
    them all), and again without the guards (how a warm decoder runs): bit for bit the same."""
    dense, graphs = runtime.decoder.dense, counters["stats"]["unique_graphs"]
    assert dense.warm
    dense.warm = False  # guards checked, as before warm-up
    try:
        guarded = packed_logits(runtime, vocab, sizes)
    finally:
        dense.warm = True
    assert counters["stats"]["unique_graphs"] == graphs
    unguarded = packed_logits(runtime, vocab, sizes)
    assert torch.equal(unguarded, guarded)
    return unguarded


def cpu_runtime(family: str, enforce_eager: bool = False, threads: StepThreads | None = None,
                dtype: torch.dtype = torch.bfloat16, compile_float32: bool = False) -> tuple[EngineRuntime, int]:
    adapter = load_adapter(family)
    return build_runtime(adapter.load_language("cpu", dtype), KVCacheConfig(1 << 22, block_size=4),
                         enforce_eager=enforce_eager, threads=threads, compile_float32=compile_float32), \
        int(adapter.text_config.vocab_size)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_compiled_layers_match_the_eager_ones_without_recompiling(family: str):
    eager_runtime, vocab = cpu_runtime(family, enforce_eager=True)
    assert not eager_runtime.decoder.dense.compiled
    runtime, _ = cpu_runtime(family, enforce_eager=False)  # compiled (and warmed up) here
    assert runtime.decoder.dense.compiled
    for sizes in (SIZES, (1,), (2, 1), (5,) * 9):  # whatever the batch, after start-up: no new graph
        compiled, eager = warm_logits(runtime, vocab, sizes), packed_logits(eager_runtime, vocab, sizes)
        torch.testing.assert_close(compiled, eager, atol=0.05 * float(eager.abs().max()), rtol=0.0)
        assert (compiled.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.75


def test_only_16_bit_cpu_layers_are_compiled_unless_float32_is_asked_for():
    cpu = torch.device("cpu")
    assert compiles(torch.bfloat16, cpu, enforce_eager=False) and compiles(torch.float16, cpu, enforce_eager=False)
    assert not compiles(torch.bfloat16, cpu, enforce_eager=True)
    assert not compiles(torch.float32, cpu, enforce_eager=False)  # the path pinned to `generate`
    assert compiles(torch.float32, cpu, enforce_eager=False, compile_float32=True)
    assert not compiles(torch.float32, cpu, enforce_eager=True, compile_float32=True)
    assert not compiles(torch.bfloat16, torch.device("cuda"), enforce_eager=False)  # CUDA graphs there


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_compiled_float32_layers_match_the_eager_ones_to_float32_rounding(family: str):
    """`--compile-float32`: fused, packed and compiled float32 layers, against the eager float32 ones
    that `generate` pins; no recompiles under any batch."""
    eager_runtime, vocab = cpu_runtime(family, dtype=torch.float32)
    assert not eager_runtime.decoder.dense.compiled
    runtime, _ = cpu_runtime(family, dtype=torch.float32, compile_float32=True)
    assert runtime.decoder.dense.compiled
    assert isinstance(runtime.decoder.layers[0].qkv_proj, PackedLinear)  # oneDNN's blocked layout
    for sizes in (SIZES, (1,), (2, 1), (5,) * 9):
        compiled, eager = warm_logits(runtime, vocab, sizes), packed_logits(eager_runtime, vocab, sizes)
        torch.testing.assert_close(compiled, eager, atol=1e-4 * float(eager.abs().max()), rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_joined_projections_compute_the_linears_side_by_side(dtype: torch.dtype):
    torch.manual_seed(0)
    linears = [nn.Linear(32, 48, bias=True).to(dtype), nn.Linear(32, 16, bias=False).to(dtype),
               nn.Linear(32, 16, bias=True).to(dtype)]
    x = torch.randn(5, 32, dtype=dtype)
    expected = torch.cat([linear(x) for linear in linears], dim=-1)
    got = joined(linears)(x)
    assert got.shape == (5, 80) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_compiled_layers_hold_their_projection_weights_once():
    runtime, _ = cpu_runtime("tiny-llava", enforce_eager=False)
    fused = runtime.decoder.layers[0]
    assert isinstance(fused, FusedLayer)
    original = runtime.decoder.language.text_model.layers[0]
    for module, name in ((original.self_attn, "q_proj"), (original.self_attn, "o_proj"),
                         (original.mlp, "gate_proj"), (original.mlp, "down_proj")):
        assert not hasattr(module, name)


def test_runtimes_built_on_one_language_part_share_its_fused_layers():
    """The offline engines and the benchmark build several runtimes on one language part: the layers are
    fused once, and every runtime computes the same logits."""
    adapter = load_adapter("tiny-llava")
    language = adapter.load_language("cpu", torch.bfloat16)
    first, second = (build_runtime(language, KVCacheConfig(1 << 22, block_size=4)) for _ in range(2))
    assert all(a is b for a, b in zip(first.decoder.layers, second.decoder.layers, strict=True))
    vocab = int(adapter.text_config.vocab_size)
    torch.testing.assert_close(packed_logits(first, vocab, SIZES), packed_logits(second, vocab, SIZES))


async def test_a_worker_told_to_compile_float32_serves_on_compiled_layers(redis_server):
    """`epd worker --compile-float32`: the flag reaches the runtime and the vision part, and the worker
    serves a request on them."""
    from epd.workers.messages import PrefillJob, SamplingParams
    from epd.workers.stages.encode import EncodeServicer
    from epd.workers.stages.prefill import PrefillServicer

    worker = worker_from_command_line("--role", "colocated", "--model", "tiny-llava", "--redis-url",
                                      redis_server.url, "--compile-float32")
    await worker.start()
    try:
        prefill = next(s for s in worker.servicers if isinstance(s, PrefillServicer)).engine
        assert prefill.decoder.dense.compiled and prefill.decoder.language.dtype == torch.float32
        vision = next(s for s in worker.servicers if isinstance(s, EncodeServicer)).vision
        assert vision.compiled and vision.dtype == torch.float32
        [features] = await worker.ctx.compute("encode", vision.encode, [EncodeInput(png_bytes(40, 30, seed=0), -1)])
        assert features.shape == (load_adapter("tiny-llava").tokens_per_tile, vision.adapter.text_config.hidden_size)
        job = PrefillJob("r", [1, 20, 30, 40, 50], [], [], SamplingParams(max_tokens=1, ignore_eos=True))
        [handoff] = await worker.ctx.compute("prefill", prefill.run, [job])
        assert 0 <= handoff.first_token < int(load_adapter("tiny-llava").text_config.vocab_size)
        await worker.ctx.compute("prefill", prefill.release, "r")
    finally:
        await worker.stop()


def test_the_vllm_comparison_runs_both_servers_at_the_precision_this_cpu_computes_natively():
    from epd.bench.vllm_compare import precision_args
    from epd.workers.engine.packed_linear import native_bfloat16

    assert precision_args("bfloat16") == (["--dtype", "bfloat16"], ["--worker-arg=--dtype=bfloat16"])
    assert precision_args("float32") == (["--dtype", "float32"],
                                         ["--worker-arg=--dtype=float32", "--worker-arg=--compile-float32"])
    assert precision_args("auto") == precision_args("bfloat16" if native_bfloat16() else "float32")
    assert native_bfloat16() == packs(torch.bfloat16, torch.device("cpu"))
