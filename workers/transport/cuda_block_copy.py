"""Block copies between two CUDA pools in one kernel launch per layer: the
blocks of a paged request are scattered, and a copy per block (or PyTorch's
generic index kernels) would run far below the device's copy bandwidth."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # elements each program moves


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, src_index, dst_index, count, src_plane, dst_plane, block_elems,
                        CHUNK: tl.constexpr):
    pair = tl.program_id(0)  # (plane, block) pair: keys of block i, then values of block i
    chunk = tl.program_id(1)
    plane = pair // count
    block = pair % count
    src_block = tl.load(src_index + block).to(tl.int64)
    dst_block = tl.load(dst_index + block).to(tl.int64)
    offsets = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < block_elems
    data = tl.load(src_ptr + plane * src_plane + src_block * block_elems + offsets, mask=mask)
    tl.store(dst_ptr + plane * dst_plane + dst_block * block_elems + offsets, data, mask=mask)


def copy_blocks(source: torch.Tensor, target: torch.Tensor, layer: int, src_blocks: torch.Tensor,
                dst_blocks: torch.Tensor) -> int:
    """Copy keys and values of `src_blocks` of one layer into `dst_blocks` (`[layers, 2, blocks, ...]`
    pools on the same device); returns bytes."""
    src, dst = source[layer], target[layer]
    count = src_blocks.numel()
    block_elems = src[0, 0].numel()
    grid = (2 * count, triton.cdiv(block_elems, CHUNK))
    _copy_blocks_kernel[grid](src, dst, src_blocks, dst_blocks, count, src.stride(0), dst.stride(0), block_elems,
                              CHUNK=CHUNK)
    return 2 * count * block_elems * src.element_size()
