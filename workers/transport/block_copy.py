"""Copying KV blocks between two pools that one process can address (the same
pool, one mapped from shared memory, or one opened from a CUDA IPC handle).

A `BlockCopyPlan` is made once per handoff: runs of consecutive block ids on
both sides become one contiguous copy per keys and values plane; with many
runs (a fragmented pool) one gather-scatter per layer does it instead, a
Triton kernel on CUDA. On CPU the gather stages a whole layer in a temporary,
so runs of real-model blocks (a LLaVA-7B block is 128 KiB per plane and
layer) are still copied run by run: that is one memcpy of the bytes, not two."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_SLICE_COPIES = 8  # beyond this many runs, one gather + scatter per layer beats a copy per run
MIN_CPU_RUN_BYTES = 64 << 10  # ... except on CPU when the runs are at least this large on average


def block_runs(source: list[int], target: list[int]) -> list[tuple[int, int, int]]:
    """(source start, target start, length) of runs where both block lists are consecutive."""
    if len(source) != len(target):
        raise ValueError(f"{len(source)} source blocks for {len(target)} target blocks")
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(source, target, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            start_src, start_dst, length = runs[-1]
            runs[-1] = (start_src, start_dst, length + 1)
        else:
            runs.append((src, dst, 1))
    return runs


@dataclass(frozen=True)
class BlockCopyPlan:
    runs: list[tuple[int, int, int]]
    source_index: torch.Tensor | None = None  # set when the runs are too many for slice copies
    target_index: torch.Tensor | None = None

    @classmethod
    def between(cls, source: list[int], target: list[int], device: torch.device) -> "BlockCopyPlan":
        runs = block_runs(source, target)
        if len(runs) <= MAX_SLICE_COPIES:
            return cls(runs)
        return cls(runs, torch.tensor(source, dtype=torch.long, device=device),
                   torch.tensor(target, dtype=torch.long, device=device))


def copy_layer(source: torch.Tensor, target: torch.Tensor, layer: int, plan: BlockCopyPlan) -> int:
    """Copy one layer's keys and values (`[layers, 2, blocks, ...]` pools) along `plan`; returns bytes."""
    source_index, target_index = plan.source_index, plan.target_index
    if source_index is None or target_index is None or _long_cpu_runs(source, plan):
        copied = 0
        for plane in range(2):  # keys, values: each run is one contiguous piece of a plane
            for src, dst, length in plan.runs:
                part = source[layer, plane, src:src + length]
                target[layer, plane, dst:dst + length].copy_(part, non_blocking=True)
                copied += part.numel() * part.element_size()
        return copied
    if source.is_cuda and target.device == source.device:
        from .cuda_block_copy import copy_blocks  # Triton: only where there is a GPU

        return copy_blocks(source, target, layer, source_index, target_index)
    part = source[layer].index_select(1, source_index)
    target[layer].index_copy_(1, target_index.to(target.device), part.to(target.device))
    return part.numel() * part.element_size()


def _long_cpu_runs(source: torch.Tensor, plan: BlockCopyPlan) -> bool:
    if source.is_cuda:
        return False
    block_bytes = source[0, 0, 0].numel() * source.element_size()
    return block_bytes * sum(length for _, _, length in plan.runs) >= MIN_CPU_RUN_BYTES * len(plan.runs)
