"""Copying KV blocks between two pools that one process can address (the same
pool, one mapped from shared memory, or one opened from a CUDA IPC handle).
Runs of consecutive block ids on both sides become one slice copy each."""

from __future__ import annotations

import torch


def block_runs(source: list[int], target: list[int]) -> list[tuple[int, int, int]]:
    """(source start, target start, length) of runs where both block lists are consecutive."""
    if len(source) != len(target):
        raise ValueError(f"{len(source)} source blocks for {len(target)} target blocks")
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(source, target):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            start_src, start_dst, length = runs[-1]
            runs[-1] = (start_src, start_dst, length + 1)
        else:
            runs.append((src, dst, 1))
    return runs


def copy_layer(source: torch.Tensor, target: torch.Tensor, layer: int, runs: list[tuple[int, int, int]]) -> int:
    """Copy one layer's keys and values (`[layers, 2, blocks, ...]` pools) along `runs`; returns bytes."""
    copied = 0
    for src, dst, length in runs:
        part = source[layer, :, src:src + length]
        target[layer, :, dst:dst + length].copy_(part, non_blocking=True)
        copied += part.numel() * part.element_size()
    return copied
