"""Checkpoints load as the hub publishes them (llava-hf LLaVA-1.5 / LLaVA-NeXT,
Qwen2-VL / Qwen2.5-VL Instruct), as transformers 5 saves them, and in our own
in-memory names, sharded or not: every stage part gets exactly the preset's
weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epd.workers.models import load_adapter
from epd.workers.models.layouts import to_hub_names
from epd.workers.models.loading import checkpoint_files

from .conftest import Stages


def write_checkpoint(source: Path, target: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Copy a model directory's non-weight files and write `tensors` as `shards` safetensors files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    names = sorted(tensors)
    if shards == 1:
        save_file({name: tensors[name].contiguous() for name in names}, target / "model.safetensors")
        return
    weight_map = {}
    for index in range(shards):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index::shards]
        save_file({name: tensors[name].contiguous() for name in part}, target / shard)
        weight_map.update({name: shard for name in part})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def internal_names(stages: Stages) -> dict[str, torch.Tensor]:
    """Every tensor of the model, named as the stages' parts name them (the tower layers the vision part
    frees included)."""
    full = stages.full.state_dict()
    return {**{name: full[name] for name in stages.vision.dropped},
            **{f"{prefix}.{name}": tensor for parts in (stages.vision.parts, stages.language.parts)
               for prefix, module in parts.items() for name, tensor in module.state_dict().items()}}


@pytest.mark.parametrize("layout, shards", [("hub", 1), ("hub", 3), ("transformers", 2), ("internal", 1)])
def test_every_layout_loads_the_same_weights(stages: Stages, tmp_path: Path, layout: str, shards: int):
    family = stages.adapter.family
    if layout == "hub":
        tensors = to_hub_names(family, internal_names(stages))
    elif layout == "transformers":  # what save_pretrained of transformers 5 wrote into the preset
        tensors = {}
        for path in checkpoint_files(stages.adapter.model_dir):
            tensors.update(load_file(str(path)))
    else:
        tensors = internal_names(stages)
    if layout == "hub" and family.startswith("llava"):
        assert any(name.startswith("vision_tower.vision_model.") for name in tensors)
        assert any(name.startswith("language_model.model.") for name in tensors)
    if layout == "hub" and family.startswith("qwen"):
        assert any(name.startswith("visual.") for name in tensors) and "lm_head.weight" in tensors
    write_checkpoint(stages.adapter.model_dir, tmp_path / "model", tensors, shards)
    adapter = load_adapter(str(tmp_path / "model"))
    for loaded, expected in ((adapter.load_vision(), stages.vision), (adapter.load_language(), stages.language)):
        for prefix, module in expected.parts.items():
            got = loaded.parts[prefix].state_dict()
            for name, tensor in module.state_dict().items():
                assert torch.equal(got[name], tensor), f"{layout}: {prefix}.{name}"
