"""Accelerator entries for the roofline model (dense bf16/fp16 peaks, HBM bandwidth)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    link_bandwidth: float  # bytes/s between GPUs (NVLink, or PCIe when none)
    compute_efficiency: float = 0.5  # achieved share of peak FLOP/s in large matmuls
    memory_efficiency: float = 0.7  # achieved share of HBM bandwidth when streaming weights/KV

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.memory_bandwidth, self.memory_bytes, self.link_bandwidth) <= 0:
            raise ValueError(f"{self.name}: hardware figures must be positive")


# Data-sheet figures: dense bf16 tensor FLOP/s (no sparsity), HBM bandwidth, memory, and the GPU-to-GPU
# link per direction (NVLink: half the bidirectional figure; L40S: PCIe Gen4 x16).
HARDWARE: dict[str, Hardware] = {
    # A100 SXM4 80GB: 312 TFLOP/s, 2,039 GB/s HBM2e, 80 GB, NVLink 3 600 GB/s
    "a100-80gb": Hardware("a100-80gb", 312e12, 2.039e12, 80e9, 300e9),
    # H100 SXM5: 989 TFLOP/s, 3.35 TB/s HBM3, 80 GB, NVLink 4 900 GB/s
    "h100": Hardware("h100", 989e12, 3.35e12, 80e9, 450e9),
    # H200 SXM: 989 TFLOP/s, 4.8 TB/s HBM3e, 141 GB, NVLink 4 900 GB/s
    "h200": Hardware("h200", 989e12, 4.8e12, 141e9, 450e9),
    # L40S: 362 TFLOP/s, 864 GB/s GDDR6, 48 GB, PCIe Gen4 x16 64 GB/s
    "l40s": Hardware("l40s", 362e12, 0.864e12, 48e9, 32e9),
}


def get_hardware(name: str) -> Hardware:
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}") from None
