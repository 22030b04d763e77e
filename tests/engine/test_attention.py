"""The paged attention kernels against PyTorch's SDPA on gathered keys and values:
random block tables, different context lengths, GQA groups, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epd.workers.engine.cpu_attention import kernel, paged_decode


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
