"""Stage costs as functions of the batch, from a roofline estimate or from a
profile measured by `epd profile`. Both give the same linear forms:

* encode batch:  a + b * vision patch tokens + c * megapixels (host preprocessing)
* prefill batch: a + b * tokens + c * sum(tokens_i^2) (attention)
* decode step:   a + b * sequences + c * context tokens in the batch (KV reads)

and the memory forms of `memory.MemoryCosts` (weights, activations per batch,
KV bytes per token, the runtime's reserve)."""

from __future__ import annotations

from dataclasses import dataclass

from .architectures import Architecture
from .hardware import Hardware
from .memory import InstanceMemory, MemoryCosts, plan_instance, roofline_memory


@dataclass(frozen=True)
class StageCosts:
    encode_fixed: float
    encode_per_patch_token: float
    encode_per_megapixel: float
    prefill_fixed: float
    prefill_per_token: float
    prefill_per_token_squared: float
    decode_fixed: float
    decode_per_sequence: float
    decode_per_context_token: float

    def encode_time(self, patch_tokens: int, megapixels: float) -> float:
        return self.encode_fixed + self.encode_per_patch_token * patch_tokens + self.encode_per_megapixel * megapixels

    def prefill_time(self, token_counts: list[int]) -> float:
        return (self.prefill_fixed + self.prefill_per_token * sum(token_counts)
                + self.prefill_per_token_squared * sum(t * t for t in token_counts))

    def decode_time(self, sequences: int, context_tokens: int) -> float:
        return self.decode_fixed + self.decode_per_sequence * sequences + self.decode_per_context_token * context_tokens


@dataclass(frozen=True)
class PerformanceModel:
    architecture: Architecture
    hardware: Hardware
    costs: StageCosts
    source: str  # "roofline" or the profile path
    memory: MemoryCosts

    def embedding_transfer_time(self, llm_tokens: int) -> float:
        return llm_tokens * self.architecture.llm.hidden * self.architecture.bytes_per_param / self.hardware.link_bandwidth

    def kv_transfer_time(self, tokens: int) -> float:
        return tokens * self.memory.kv_per_token / self.hardware.link_bandwidth

    def instance_memory(self, role: str, encode_batch: int = 16, prefill_budget: int = 16384,
                        decode_batch: int = 128) -> InstanceMemory:
        """The memory layout of one GPU serving `role` under these batch limits."""
        return plan_instance(self.memory, self.architecture, self.hardware.memory_bytes, role, encode_batch,
                             prefill_budget, decode_batch)

    def kv_capacity_tokens(self, decode_batch: int = 128) -> int:
        """KV tokens one decode GPU holds."""
        return self.instance_memory("decode", decode_batch=decode_batch).kv_tokens


def roofline(arch: Architecture, hw: Hardware, vision_attention: str = "flash") -> PerformanceModel:
    """Compute-bound encode and prefill, memory-bound decode, at the hardware's efficiencies."""
    flops = hw.peak_flops * hw.compute_efficiency
    bandwidth = hw.memory_bandwidth * hw.memory_efficiency
    llm = arch.llm
    vision_per_token = 2 * arch.vision.params / flops  # the projector's FLOPs are < 10% of the tower's
    attention_per_token_sq = 2 * llm.layers * llm.hidden / flops  # QK^T and AV, causal half
    costs = StageCosts(
        encode_fixed=0.002 + arch.vision_weight_bytes / bandwidth, encode_per_patch_token=vision_per_token,
        encode_per_megapixel=0.02,  # JPEG decode + resize/slicing on the host (~0.25 s for a 12 MP photo)
        prefill_fixed=0.003 + arch.llm_weight_bytes / bandwidth, prefill_per_token=2 * llm.params / flops,
        prefill_per_token_squared=attention_per_token_sq,
        decode_fixed=0.001 + arch.llm_weight_bytes / bandwidth, decode_per_sequence=2 * llm.params / flops,
        decode_per_context_token=arch.kv_bytes_per_token / bandwidth)
    source = "roofline" + ("" if vision_attention == "flash" else f" (vision attention {vision_attention})")
    return PerformanceModel(arch, hw, costs, source, roofline_memory(arch, vision_attention))
