"""Stage memory: what each kind of GPU instance holds, as linear forms of its
batch (the memory counterpart of `perfmodel.StageCosts`).

An instance's usable memory (the runtime's share of the device, vLLM's
`gpu_memory_utilization`) holds, in this order:

* the weights of the parts it loads (encode: vision tower + projector;
  prefill/decode: the language model; bundled and co-located: both);
* the runtime's reserve (CUDA context, library workspaces, allocator slack);
* an activation reserve for the largest batch its limits admit (the paged KV
  pool is allocated once next to it, as the engines do);
* the KV pool: whatever is left, in tokens of `kv_per_token` bytes.

An encode instance keeps no KV: everything after its weights is activation
room, so its batch is bounded by memory rather than by a reservation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .architectures import Architecture, Tower

ROLES = ("encode", "prefill", "decode", "encode+prefill", "colocated")
USABLE_FRACTION = 0.9  # vLLM's default gpu_memory_utilization
# Outside the tensors: CUDA context and library workspaces (0.74 GB measured on an H200 with torch 2.11),
# decode's CUDA graphs and the caching allocator's fragmentation
RUNTIME_RESERVE_BYTES = 1.5e9
ATTENTION_KINDS = ("flash", "eager")
# Eager attention holds each score as bf16, its fp32 softmax and the bf16 probabilities (8 bytes), plus the
# attention phase's own tensors: 9 bytes per score and head matched SigLIP and CLIP measured on an H200.
EAGER_SCORE_BYTES = 9


@dataclass(frozen=True)
class MemoryCosts:
    vision_weights: float
    language_weights: float
    runtime_reserve: float
    encode_per_patch_token: float  # working set of the widest vision layer, pixels and outputs
    encode_per_tile_token_squared: float  # materialised attention scores (0 with flash / SDPA kernels)
    prefill_fixed: float  # logits of one position (rows are sampled one at a time)
    prefill_per_token: float
    decode_fixed: float
    decode_per_sequence: float  # one token's working set plus its logits row
    kv_per_token: float
    usable_fraction: float = USABLE_FRACTION
    encode_fixed: float = 0.0  # a profile's intercept (buffers a batch of any size allocates)

    def encode_activation(self, patch_tokens: int, tile_token_squares: int) -> float:
        return (self.encode_fixed + self.encode_per_patch_token * patch_tokens
                + self.encode_per_tile_token_squared * tile_token_squares)

    def prefill_activation(self, tokens: int) -> float:
        """A chunked prefill never holds more than its token budget's activations at once."""
        return self.prefill_fixed + self.prefill_per_token * tokens

    def decode_activation(self, sequences: int) -> float:
        return self.decode_fixed + self.decode_per_sequence * sequences


def _working_set(tower: Tower) -> int:
    """Values per token alive at a layer's peak with flash / SDPA attention, which is the MLP's: the residual
    stream, its normed copy, the layer's input the caller still holds and its output, plus the MLP's live
    intermediate tensors. Measured on an H200 (bf16, Hugging Face SigLIP, CLIP and Qwen2 layers) within 2%."""
    return 4 * tower.hidden + tower.mlp_live_tensors * tower.intermediate


def roofline_memory(arch: Architecture, attention: str = "flash") -> MemoryCosts:
    """Memory forms from the architecture. `attention` is the vision tower's kernel: "flash" (SDPA /
    flash-attention: no score matrix) or "eager" (scores materialised per tile, as Hugging Face's eager
    path and early vLLM vision towers do)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    width = arch.bytes_per_param
    vision, llm = arch.vision, arch.llm
    pixels_per_patch = 3 * 14 * 14 * (4 + width)  # fp32 pixel values from the processor and their cast copy
    outputs_per_patch = (arch.llm_tokens_per_tile / max(arch.vision_tokens_per_tile, 1) if arch.tile_pixels
                         else 0.25) * llm.hidden * width
    per_token = (_working_set(llm) + 2 * llm.head_dim) * width  # and the rotary cos/sin rows
    logits_row = arch.vocab * 4 * 2  # fp32 logits and the sampler's probabilities
    return MemoryCosts(
        vision_weights=arch.vision_weight_bytes, language_weights=arch.llm_weight_bytes,
        runtime_reserve=RUNTIME_RESERVE_BYTES,
        encode_per_patch_token=_working_set(vision) * width + pixels_per_patch + outputs_per_patch,
        encode_per_tile_token_squared=vision.heads * EAGER_SCORE_BYTES if attention == "eager" else 0.0,
        prefill_fixed=logits_row, prefill_per_token=per_token, decode_fixed=0.0,
        decode_per_sequence=per_token + logits_row, kv_per_token=arch.kv_bytes_per_token)


@dataclass(frozen=True)
class InstanceMemory:
    """How one instance's usable memory is laid out (bytes), and its KV pool in tokens."""

    role: str
    usable: float
    weights: float
    reserve: float
    activation: float
    kv_pool: float
    kv_tokens: int

    @property
    def shortfall(self) -> float:
        """Bytes missing for weights + reserve + activation reserve (0 when they fit)."""
        return max(0.0, self.weights + self.reserve + self.activation - self.usable)

    def problem(self) -> str:
        """Why this instance cannot serve at all ('' when it can)."""
        if self.shortfall > 0:
            return (f"{self.role}: weights {gb(self.weights)} + runtime {gb(self.reserve)} + activation reserve "
                    f"{gb(self.activation)} exceed the usable {gb(self.usable)}")
        if self.role != "encode" and self.kv_tokens <= 0:
            return f"{self.role}: no memory left for the KV cache"
        return ""

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "usable_gb": _round_gb(self.usable), "weights_gb": _round_gb(self.weights),
                "runtime_reserve_gb": _round_gb(self.reserve), "activation_gb": _round_gb(self.activation),
                "kv_pool_gb": _round_gb(self.kv_pool), "kv_tokens": self.kv_tokens}


def gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB"


def _round_gb(value: float) -> float:
    return round(value / 1e9, 3)


def worst_case_encode_activation(memory: MemoryCosts, arch: Architecture, images: int) -> float:
    """Activations of `images` images of the largest kind the preprocessor makes, in one vision forward."""
    width, height = arch.largest_image()
    return memory.encode_activation(images * arch.vision_patch_tokens(width, height),
                                    images * arch.tile_token_squares(width, height))


def plan_instance(memory: MemoryCosts, arch: Architecture, device_bytes: float, role: str, encode_batch: int,
                  prefill_budget: int, decode_batch: int) -> InstanceMemory:
    """The memory layout of one instance of `role` under the given batch limits."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    usable = device_bytes * memory.usable_fraction
    vision, language = memory.vision_weights, memory.language_weights
    weights = {"encode": vision, "prefill": language, "decode": language}.get(role, vision + language)
    reserve = memory.runtime_reserve
    if role == "encode":
        return InstanceMemory(role, usable, weights, reserve, max(0.0, usable - weights - reserve), 0.0, 0)
    needs = {"prefill": [memory.prefill_activation(prefill_budget)],
             "decode": [memory.decode_activation(decode_batch)],
             "encode+prefill": [memory.prefill_activation(prefill_budget),
                                worst_case_encode_activation(memory, arch, encode_batch)]}
    needs["colocated"] = needs["encode+prefill"] + needs["decode"]
    activation = max(needs[role])  # the stages of one instance run one batch at a time
    pool = usable - weights - reserve - activation
    kv_tokens = int(pool // memory.kv_per_token) if pool > 0 else 0
    return InstanceMemory(role, usable, weights, reserve, activation, max(pool, 0.0), kv_tokens)
