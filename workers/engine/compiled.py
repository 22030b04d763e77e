"""The dense parts of each decoder layer, eager or compiled by TorchInductor.

Around its attention call a layer runs some forty small ops: RMSNorm's casts
and reduction, the projections, RoPE's slices and products, the MLP's
activation, the residual adds. Eager PyTorch dispatches each one from Python
and makes a pass over memory for each; Inductor fuses the element-wise ones
into a few vectorised C++ loops around oneDNN matmuls, as vLLM's CPU backend
does through torch.compile; the compiled layers' projections are fused and laid
out for oneDNN once (`fused_layer`). Measured here (small-llava, bfloat16, 2 cores,
eager and compiled calls alternating in one process): prefill of 16 prompts of
90 tokens 1.19-1.22x faster than eager with prepacked weights; decode steps of
64 sequences the same (they are bound by reading the weights and the KV).

The token count is a dynamic dimension, so one graph serves every batch (and a
second one batches of a single token); `warm_up` compiles both when the worker
starts (about 30 s on 2 cores the first time, seconds once Inductor's on-disk
cache holds them), never under a request. Attention and the KV pool writes stay
outside: they read and write the paged pool in place.

Once warm, the forwards skip Dynamo's guard checks (as vLLM's compiled models
dispatch straight to their graphs): every call had checked some hundred guards
over the layer's modules and inputs, 110 us each, sixteen calls a step for
small-llava, when after warm-up the only thing left to tell the graphs apart
is what Dynamo keeps checking in this mode: the guards that ever failed (the
single-token specialisation, the thread count). Measured here (small-llava,
bfloat16, 2 cores, offline, blocks of steps alternating in one process): decode
steps of 64 sequences 32.2 against 34.4 ms with the guards, of 8 sequences 10.5
against 11.1 ms. A forward that finds no graph (one warm-up missed) compiles it
then with the guards checked, and logs it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..dynamo_limits import allow_graphs
from .fused_layer import FusedLayer, fused_attention_inputs, fused_layer_output

log = logging.getLogger(__name__)

# A transformers decoder layer (LlamaDecoderLayer, Qwen2DecoderLayer): its submodules are untyped there.
Layer = Any
Rotary = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the family's apply_rotary_pos_emb
# (layer, [1, T, hidden] input, [T, dim] cos, sin, rotary fn, head_dim) -> [T, heads, dim] query, keys, values
AttentionInputs = Callable[[Layer, torch.Tensor, torch.Tensor, torch.Tensor, Rotary, int],
                           tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (layer, [1, T, hidden] residual, [T, heads, dim] attention output) -> [1, T, hidden] layer output
LayerOutput = Callable[[Layer, torch.Tensor, torch.Tensor], torch.Tensor]

def attention_inputs(layer: Layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     apply_rotary: Rotary, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's normalised input projected to queries, keys and values, RoPE applied."""
    tokens = hidden.shape[1]
    states = layer.input_layernorm(hidden)[0]
    attn = layer.self_attn
    query = attn.q_proj(states).view(tokens, -1, head_dim)
    keys = attn.k_proj(states).view(tokens, -1, head_dim)
    values = attn.v_proj(states).view(tokens, -1, head_dim)
    query, keys = apply_rotary(query, keys, cos, sin, unsqueeze_dim=1)
    return query, keys, values


def layer_output(layer: Layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The attention output projected and added to the residual, then the MLP block."""
    hidden = residual + layer.self_attn.o_proj(attended.reshape(1, attended.shape[0], -1))
    out: torch.Tensor = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return out


class DenseParts:
    """The two halves of a layer around attention; compiled, or the plain functions."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.warm = False  # every graph the forwards will call is compiled
        self.attention_inputs: AttentionInputs = attention_inputs
        self.layer_output: LayerOutput = layer_output
        if compiled:
            allow_graphs()
            self.attention_inputs = compiling_misses(torch.compile(fused_attention_inputs, dynamic=True))
            self.layer_output = compiling_misses(torch.compile(fused_layer_output, dynamic=True))

    def layers(self, layers: list[Layer]) -> list[Layer]:
        """The decoder layers as these dense parts take them: fused (compiled), or as they are."""
        return [FusedLayer.of(layer) for layer in layers] if self.compiled else layers

    def warm_up(self, layer: Layer, rotary: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                apply_rotary: Rotary, head_dim: int, hidden_size: int, heads: int,
                thread_counts: Sequence[int]) -> None:
        """Compile the graphs every batch will use (several tokens, then a single one, on each of
        `thread_counts` threads) on zero inputs."""
        if not self.compiled:
            return
        start = time.perf_counter()
        weight = next(layer.parameters())
        full = torch.get_num_threads()
        try:
            for count in thread_counts:
                torch.set_num_threads(count)
                for tokens in (2, 1):
                    cos, sin = rotary(tokens)
                    hidden = weight.new_zeros((1, tokens, hidden_size))
                    self.attention_inputs(layer, hidden, cos, sin, apply_rotary, head_dim)
                    self.layer_output(layer, hidden, weight.new_zeros((tokens, heads, head_dim)))
        finally:
            torch.set_num_threads(full)
        self.warm = True
        log.info("compiled the decoder layers' dense parts in %.1f s", time.perf_counter() - start)

    def unguarded(self) -> AbstractContextManager[object]:
        """Calls of the compiled parts in this context skip the guards that never failed (see the module
        docstring); before warm-up, and for eager parts, nothing changes."""
        if not self.warm:
            return nullcontext()
        stance: AbstractContextManager[object] = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return stance


def compiling_misses(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled`, which compiles a graph that warm-up did not make instead of failing the step: in the
    unguarded stance Dynamo refuses to compile, before running anything, so the call is made again with
    the guards checked."""
    def call(*args: Any) -> Any:
        try:
            return compiled(*args)
        except RuntimeError as exc:
            if "skip_guard_eval_unsafe" not in str(exc):
                raise
            log.warning("compiling a graph that warm-up did not make (threads: %d)", torch.get_num_threads())
            with torch.compiler.set_stance("default"):
                return compiled(*args)

    return call


def compiles(dtype: torch.dtype, device: torch.device, enforce_eager: bool, compile_float32: bool = False) -> bool:
    """Whether layers of this dtype on this device are compiled: 16-bit weights on CPU, unless eager is
    enforced. Float32 stays eager unless `compile_float32` (eager float32 is exact against `generate`
    token for token; fusion and oneDNN's blocked matmuls reorder float arithmetic); on CUDA, decode
    replays CUDA graphs of the eager layers instead."""
    if device.type != "cpu" or enforce_eager:
        return False
    return dtype in (torch.bfloat16, torch.float16) or compile_float32 and dtype == torch.float32
