"""The paged attention kernels against PyTorch's SDPA on gathered keys and values:
random block tables, different context lengths, GQA groups, float32 and 16-bit;
and the C++ backend's split of a mixed batch between its two kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epd.workers.engine.attention import CpuPagedAttention, SdpaAttention
from epd.workers.engine.batch import PackedBatch
from epd.workers.engine.block_allocator import BlockAllocator
from epd.workers.engine.cpu_attention import kernel, paged_decode, paged_prefill
from epd.workers.engine.kv_pool import KVLayout, KVPool


def reference(query, keys, values, tables, lengths, scale):
    block = keys.shape[1]
    out = []
    for b, length in enumerate(lengths.tolist()):
        slots = [tables[b, t // block].item() * block + t % block for t in range(length)]
        k = keys.flatten(0, 1)[slots].transpose(0, 1).unsqueeze(0).float()
        v = values.flatten(0, 1)[slots].transpose(0, 1).unsqueeze(0).float()
        out.append(F.scaled_dot_product_attention(query[b:b + 1].unsqueeze(2).float(), k, v, scale=scale,
                                                  enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (12, 6)])
@pytest.mark.parametrize("batch", [1, 4])  # one sequence: its KV heads are split in runs across threads
def test_cpu_paged_decode_matches_sdpa(dtype, tolerance, heads, kv_heads, batch):
    if kernel() is None:
        pytest.fail("the CPU paged-attention kernel did not build: is a C++ compiler installed? (scripts/setup.sh)")
    generator = torch.Generator().manual_seed(0)
    blocks, block, dim = 40, 4, 32
    keys = torch.randn(blocks, block, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(blocks, block, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.tensor([33, 5, 17, 1][:batch])
    tables = torch.randperm(blocks, generator=generator)[:batch * 9].view(batch, 9)
    query = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    got = paged_decode(query, keys, values, tables, lengths, dim ** -0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference(query, keys, values, tables, lengths, dim ** -0.5),
                               atol=tolerance, rtol=tolerance)


def prefill_reference(query, keys, values, tables, starts, lens, contexts, scale):
    """Each chunk's queries (the last of its context's positions) attending causally over its gathered blocks."""
    block = keys.shape[1]
    out = torch.zeros_like(query, dtype=torch.float32)
    for s, (start, n, context) in enumerate(zip(starts.tolist(), lens.tolist(), contexts.tolist(), strict=True)):
        slots = [tables[s, t // block].item() * block + t % block for t in range(context)]
        k = keys.flatten(0, 1)[slots].transpose(0, 1).unsqueeze(0).float()
        v = values.flatten(0, 1)[slots].transpose(0, 1).unsqueeze(0).float()
        mask = torch.ones(n, context, dtype=torch.bool).tril(context - n)
        q = query[start:start + n].transpose(0, 1).unsqueeze(0).float()
        out[start:start + n] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                              enable_gqa=True)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 32), (8, 2, 64), (6, 3, 40), (14, 2, 80)])
def test_cpu_paged_prefill_matches_sdpa(dtype, tolerance, heads, kv_heads, dim):
    """Chunks with and without a cached prefix, one spanning several query tiles, one of a single token;
    packed in any order, with other rows (here left zero) between them."""
    if kernel() is None:
        pytest.fail("the CPU paged-attention kernel did not build: is a C++ compiler installed? (scripts/setup.sh)")
    generator = torch.Generator().manual_seed(1)
    blocks, block = 160, 4
    keys = torch.randn(blocks, block, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(blocks, block, kv_heads, dim, generator=generator).to(dtype)
    lens = torch.tensor([150, 7, 1, 33])
    contexts = torch.tensor([150, 7 + 20, 1 + 9, 33 + 64])  # new tokens after 0, 20, 9 and 64 cached ones
    starts = torch.tensor([40, 0, 200, 300])
    tables = torch.randperm(blocks, generator=generator)[:4 * 38].view(4, 38)
    query = torch.randn(340, heads, dim, generator=generator).to(dtype)
    out = torch.zeros_like(query)
    paged_prefill(out, query, keys, values, tables, starts, lens, contexts, dim ** -0.5)
    expected = prefill_reference(query, keys, values, tables, starts, lens, contexts, dim ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    assert out[190:200].abs().sum() == 0  # rows of no chunk are left alone


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_paged_backend_attends_a_mixed_batch_like_sdpa(dtype, tolerance):
    """A mixed batch (decode rows, short prompt chunks with and without a cached prefix, a prompt of many key
    tiles) through the C++ backend's two kernels gives SDPA's outputs."""
    if kernel() is None:
        pytest.fail("the CPU paged-attention kernel did not build: is a C++ compiler installed? (scripts/setup.sh)")
    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype)
    pool = KVPool(layout, 160)
    allocator = BlockAllocator(pool.num_blocks)
    generator = torch.Generator().manual_seed(2)
    batch = PackedBatch(layout.block_size)
    for cached, new in ((30, 1), (5, 1), (0, 100), (48, 20), (0, 840)):
        table = allocator.allocate(-(-(cached + new) // layout.block_size))
        batch.add(table, cached, new, torch.arange(cached, cached + new), wants_logits=True)
    batch.finish(torch.device("cpu"))
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=generator).to(dtype))
    tokens = batch.num_tokens
    query = torch.randn(tokens, 8, 32, generator=generator).to(dtype)
    new_keys, new_values = pool.slots(0)
    keys, values = new_keys[batch.slot_tensor].clone(), new_values[batch.slot_tensor].clone()
    got = CpuPagedAttention(pool, 32 ** -0.5).attend(0, query, keys, values, batch)
    expected = SdpaAttention(pool, 32 ** -0.5).attend(0, query, keys, values, batch)
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
