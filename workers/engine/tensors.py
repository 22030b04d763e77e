"""Tensor helpers of the engines: (shape, dtype name, raw bytes), the form tensors
travel in over gRPC."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedTensor:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    data: bytes


def pack(tensor: torch.Tensor) -> PackedTensor:
    """Raw little-endian row-major bytes of a tensor (bfloat16 included)."""
    cpu = tensor.detach().contiguous().cpu()
    raw = cpu.view(torch.uint8) if cpu.dim() else cpu.reshape(1).view(torch.uint8)
    return PackedTensor(tuple(cpu.shape), str(cpu.dtype).removeprefix("torch."), raw.numpy().tobytes())


def unpack(packed: PackedTensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Inverse of `pack`; raises ValueError on an unknown dtype or a size mismatch."""
    dtype = getattr(torch, packed.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {packed.dtype!r}")
    expected = dtype.itemsize
    for dim in packed.shape:
        expected *= dim
    if expected != len(packed.data):
        raise ValueError(f"tensor of shape {packed.shape} and dtype {packed.dtype} needs {expected} bytes, "
                         f"got {len(packed.data)}")
    flat = torch.frombuffer(bytearray(packed.data), dtype=torch.uint8) if packed.data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(packed.shape).to(device)

