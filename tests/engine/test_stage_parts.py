"""Each stage loads only its own part of the model."""

from __future__ import annotations

import pytest
import torch

from epd.workers.models import LlavaAdapter, Qwen25VLAdapter, load_adapter
from epd.workers.models.reference_configs import llava_15_7b, qwen25_vl_7b


def names(parts) -> set[str]:
    return {f"{prefix}.{name}" for prefix, module in parts.items() for name, _ in module.named_parameters()}


def test_stage_parts_partition_the_full_model(stages):
    full = {name for name, _ in stages.full.named_parameters()}
    vision, language = names(stages.vision.parts), names(stages.language.parts)
    assert not vision & language
    assert vision | language | stages.vision.dropped == full
    assert not (vision | language) & stages.vision.dropped
    assert all("vision" in n or "visual" in n or "projector" in n for n in vision | stages.vision.dropped)
    assert not any("vision_tower" in n or "visual" in n for n in language)


def test_stage_weights_equal_the_full_model(stages):
    full = dict(stages.full.named_parameters())
    for parts in (stages.vision.parts, stages.language.parts):
        for prefix, module in parts.items():
            for name, param in module.named_parameters():
                assert torch.equal(param, full[f"{prefix}.{name}"]), f"{prefix}.{name}"


def test_real_size_stage_bytes_counted_on_meta_device():
    llava = LlavaAdapter.stage_parameter_bytes(llava_15_7b())
    qwen = Qwen25VLAdapter.stage_parameter_bytes(qwen25_vl_7b())
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + projector ~0.32B params, Vicuna-7B ~6.74B params (bf16 bytes)
    assert 0.30e9 * 2 < llava["encode"] < 0.34e9 * 2
    assert 6.6e9 * 2 < llava["prefill"] == llava["decode"] < 6.9e9 * 2
    # Qwen2.5-VL-7B: ~0.67B vision, ~7.6B language
    assert 0.6e9 * 2 < qwen["encode"] < 0.7e9 * 2
    assert 7.4e9 * 2 < qwen["prefill"] < 7.7e9 * 2
    share = {name: b["encode"] / (b["encode"] + b["prefill"]) for name, b in (("llava", llava), ("qwen", qwen))}
    print(f"encode stage share of parameters: {share}")
    assert share["llava"] < 0.05 and share["qwen"] < 0.09


def test_unknown_model_is_named():
    from epd.workers.models import UnknownModelError

    with pytest.raises(UnknownModelError, match="no-such-model"):
        load_adapter("no-such-model")


def test_llava_tower_stops_at_its_feature_layer(stages):
    """LLaVA's features come from the tower's second-to-last layer: the last one is freed, and the features
    are still exactly the full model's."""
    if stages.adapter.family not in ("llava", "llava_next"):
        pytest.skip("Qwen2-VL's features come from the tower's last layer")
    layers = stages.full.config.vision_config.num_hidden_layers
    assert stages.vision.dropped and all(f".layers.{layers - 1}." in name for name in stages.vision.dropped)
    size = stages.full.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    hidden = stages.full.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == layers + 1
    expected = stages.full.model.multi_modal_projector(hidden[-2][:, 1:])
    assert torch.equal(stages.vision.features(pixels), expected)
