"""Stage costs as functions of the batch, from a roofline estimate or from a
profile measured by `epd profile`. Both give the same linear forms:

* encode batch:  a + b * vision patch tokens + c * megapixels (host preprocessing)
* prefill batch: a + b * tokens + c * sum(tokens_i^2) (attention)
* decode step:   a + b * sequences + c * context tokens in the batch (KV reads)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .architectures import Architecture
from .hardware import Hardware

PROFILE_VERSION = 1


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

    def embedding_transfer_time(self, llm_tokens: int) -> float:
        return llm_tokens * self.architecture.llm_hidden * self.architecture.bytes_per_param / self.hardware.link_bandwidth

    def kv_transfer_time(self, tokens: int) -> float:
        return tokens * self.architecture.kv_bytes_per_token / self.hardware.link_bandwidth

    def kv_capacity_tokens(self) -> int:
        """KV tokens a decode GPU holds after the language weights (10% kept for activations)."""
        free = self.hardware.memory_bytes * 0.9 - self.architecture.llm_weight_bytes
        return max(0, int(free / self.architecture.kv_bytes_per_token))

    def stage_memory_bytes(self) -> dict[str, float]:
        arch = self.architecture
        return {"encode": arch.vision_weight_bytes, "prefill": arch.llm_weight_bytes, "decode": arch.llm_weight_bytes,
                "colocated": arch.vision_weight_bytes + arch.llm_weight_bytes}


def roofline(arch: Architecture, hw: Hardware) -> PerformanceModel:
    """Compute-bound encode and prefill, memory-bound decode, at the hardware's efficiencies."""
    flops = hw.peak_flops * hw.compute_efficiency
    bandwidth = hw.memory_bandwidth * hw.memory_efficiency
    vision_per_token = 2 * arch.vision_params / flops
    attention_per_token_sq = 2 * arch.llm_layers * arch.llm_hidden / flops  # QK^T and AV, causal half
    costs = StageCosts(
        encode_fixed=0.002 + arch.vision_weight_bytes / bandwidth, encode_per_patch_token=vision_per_token,
        encode_per_megapixel=0.02,  # JPEG decode + resize/slicing on the host (~0.25 s for a 12 MP photo)
        prefill_fixed=0.003 + arch.llm_weight_bytes / bandwidth, prefill_per_token=2 * arch.llm_params / flops,
        prefill_per_token_squared=attention_per_token_sq,
        decode_fixed=0.001 + arch.llm_weight_bytes / bandwidth, decode_per_sequence=2 * arch.llm_params / flops,
        decode_per_context_token=arch.kv_bytes_per_token / bandwidth)
    return PerformanceModel(arch, hw, costs, "roofline")


def load_profile(path: Path, arch: Architecture, hw: Hardware) -> PerformanceModel:
    """Fit the cost forms to the samples of an `epd profile` JSON file."""
    data = json.loads(Path(path).read_text())
    if data.get("version") != PROFILE_VERSION:
        raise ValueError(f"{path}: profile version {data.get('version')!r}, expected {PROFILE_VERSION}")
    enc = _fit([[1, s["patch_tokens"], s["megapixels"]] for s in data["encode"]], [s["seconds"] for s in data["encode"]])
    pre = _fit([[1, sum(s["tokens"]), sum(t * t for t in s["tokens"])] for s in data["prefill"]],
               [s["seconds"] for s in data["prefill"]])
    dec = _fit([[1, s["sequences"], s["context_tokens"]] for s in data["decode"]], [s["seconds"] for s in data["decode"]])
    return PerformanceModel(arch, hw, StageCosts(*enc, *pre, *dec), str(path))


def _fit(rows: list[list[float]], seconds: list[float]) -> list[float]:
    """Non-negative least squares for three coefficients (a tiny projected-gradient-free version:
    solve, then drop negative terms and re-solve)."""
    import numpy as np

    if len(rows) < 3:
        raise ValueError("a profile needs at least 3 samples per stage")
    x, y = np.asarray(rows, dtype=float), np.asarray(seconds, dtype=float)
    active = [0, 1, 2]
    while True:
        coef = np.zeros(3)
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[active] = solution
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return [float(c) for c in coef]
        active = [i for i in active if i not in negative]


def profile_document(model: str, hardware: str, encode: list[dict], prefill: list[dict], decode: list[dict]) -> dict:
    """The JSON `epd profile` writes (and `load_profile` reads)."""
    return {"version": PROFILE_VERSION, "model": model, "hardware": hardware,
            "encode": encode, "prefill": prefill, "decode": decode}


def describe(model: PerformanceModel) -> dict:
    return {"model": model.architecture.name, "hardware": model.hardware.name, "source": model.source,
            "costs": asdict(model.costs)}
