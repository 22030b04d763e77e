"""Paged decode attention on CUDA: a Triton kernel of ours.

One program per (sequence, KV head) walks the sequence's context in tiles of
`TILE` tokens, looking each token's block up in the block table, with an
online softmax; the query heads of a GQA group share every key and value they
read, and both products run on tensor cores (the group padded to 16 rows). The grid and shapes depend only on the batch size and the table width,
so the kernel can be captured in a CUDA graph. Prefill (many queries per
sequence, compute-bound) stays on PyTorch's SDPA (FlashAttention on CUDA)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import PagedDecodeAttention


# Written in Triton's language: its arguments are pointers and constexprs that Triton reads, not Python types.
@triton.jit  # type: ignore[untyped-decorator]
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,  # type: ignore[no-untyped-def]
                         max_blocks, heads, kv_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + group
    q = tl.load(q_ptr + (seq * heads + head)[:, None] * HEAD_DIM + dims[None, :],
                mask=(group < GROUP)[:, None], other=0.0)
    length = tl.load(lens_ptr + seq)
    best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    token_stride = kv_heads * HEAD_DIM
    for start in range(0, length, TILE):
        tokens = start + tl.arange(0, TILE)
        valid = tokens < length
        block = tl.load(tables_ptr + seq * max_blocks + tokens // BLOCK_SIZE, mask=valid, other=0)
        rows = (block.to(tl.int64) * BLOCK_SIZE + tokens % BLOCK_SIZE) * token_stride + kvh * HEAD_DIM
        k = tl.load(k_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE] on tensor cores
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        rescale = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        v = tl.load(v_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        total = total * rescale + tl.sum(p, axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + (seq * heads + head)[:, None] * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(group < GROUP)[:, None])


def paged_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float, tile: int = 64) -> torch.Tensor:
    """`[B, heads, dim]` outputs of one query per sequence over `[blocks, block_size, kv_heads, dim]`
    paged keys and values, with `[B, max_blocks]` block tables and `[B]` context lengths."""
    batch, heads, dim = query.shape
    _, block_size, kv_heads, _ = keys.shape
    group = heads // kv_heads
    out = torch.empty_like(query)
    # tensor-core dots need 16 rows: the GQA group is padded (masked) to at least 16 query heads
    _paged_decode_kernel[(batch, kv_heads)](
        query.contiguous(), keys, values, tables, lengths, out, scale, tables.shape[1], heads, kv_heads,
        HEAD_DIM=dim, BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        TILE=tile, PRECISION="ieee" if query.dtype == torch.float32 else "tf32")
    return out


class TritonPagedAttention(PagedDecodeAttention):
    """Decode through the Triton kernel above."""

    name = "triton"
    kernel = paged_decode
