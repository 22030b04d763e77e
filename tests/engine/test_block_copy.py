"""Block copies between pools land every block where the plan says, whichever way
they are done: slice copies of a few runs, a gather-scatter of many short runs,
and (on CPU) run-by-run copies of many long runs."""

from __future__ import annotations

import random

import pytest
import torch

from epd.workers.transport import block_copy
from epd.workers.transport.block_copy import BlockCopyPlan, copy_layer


def pools(block_elements: int, blocks: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    source = torch.randn(2, 2, blocks, block_elements)  # [layers, keys/values, blocks, ...]
    return source, torch.zeros_like(source)


@pytest.mark.parametrize("block_elements, shuffled, way", [(8, False, "slices"), (8, True, "gather"),
                                                          (1 << 15, True, "long runs")])
def test_every_block_lands_where_the_plan_says(block_elements, shuffled, way):
    source, target = pools(block_elements)
    sources = list(range(0, 40))
    targets = list(range(64 - 40, 64))
    if shuffled:  # a fragmented pool: runs of 2 blocks in scattered places
        pairs = [targets[i:i + 2] for i in range(0, 40, 2)]
        random.Random(5).shuffle(pairs)
        targets = [block for pair in pairs for block in pair]
    plan = BlockCopyPlan.between(sources, targets, source.device)
    assert (plan.source_index is None) == (way == "slices")
    assert block_copy._long_cpu_runs(source, plan) == (way == "long runs")
    copied = sum(copy_layer(source, target, layer, plan) for layer in range(2))
    assert copied == source[:, :, :40].numel() * source.element_size()
    assert torch.equal(target[:, :, targets], source[:, :, sources])
    untouched = sorted(set(range(64)) - set(targets))
    assert not target[:, :, untouched].any()
