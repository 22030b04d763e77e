"""The vision tower and projector compiled by TorchInductor wherever the decoder
layers are (16-bit weights on CPU, or float32 with `--compile-float32`): the
graphs are made at start for one item and for several, so no batch compiles
one; the features stay within float32's rounding of the eager tower's; and
Qwen2-VL's tower (patch sequences of every length) stays eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from epd.workers.models import load_adapter


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next"])
def test_a_compiled_tower_gives_the_eager_features_and_compiles_nothing_under_a_batch(family: str):
    adapter = load_adapter(family)
    eager, compiled = adapter.load_vision("cpu", torch.float32), adapter.load_vision("cpu", torch.float32)
    assert compiled.compile() and compiled.compiled and not eager.compiled
    graphs = counters["stats"]["unique_graphs"]
    side = int(adapter.config.vision_config.image_size)
    generator = torch.Generator().manual_seed(0)
    for items in (1, 3, 7, 2):
        pixels = torch.randn(items, 3, side, side, generator=generator)
        expected = eager.features(pixels)
        got = compiled.features(pixels)
        assert got.shape == expected.shape == (items, adapter.tokens_per_tile, int(adapter.text_config.hidden_size))
        torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0.0)
    assert counters["stats"]["unique_graphs"] == graphs


def test_qwen2_vl_keeps_its_tower_eager():
    vision = load_adapter("tiny-qwen2-vl").load_vision("cpu", torch.float32)
    assert not vision.compile() and not vision.compiled
