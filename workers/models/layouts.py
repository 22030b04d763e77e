"""Checkpoint tensor names: how the hub publishes each family, how
transformers 5 saves it, and the names our stage parts use in memory.

One table per family maps our prefixes to the hub's; reading accepts the hub
layout, the layout transformers 5 writes, and our own, and writing the hub
layout (tests, and peers such as vLLM that read only it) uses the same table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

# our prefix -> the hub's (llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-*, Qwen/Qwen2(.5)-VL-*-Instruct)
HUB_PREFIXES: dict[str, dict[str, str]] = {
    "llava": {"model.vision_tower.": "vision_tower.vision_model.",
              "model.multi_modal_projector.": "multi_modal_projector.",
              "model.language_model.": "language_model.model.",
              "lm_head.": "language_model.lm_head.",
              "model.image_newline": "image_newline"},
    "qwen2_vl": {"model.visual.": "visual.",
                 "model.language_model.layers.": "model.layers.",
                 "model.language_model.embed_tokens.": "model.embed_tokens.",
                 "model.language_model.norm.": "model.norm.",
                 "lm_head.": "lm_head."},
}
HUB_PREFIXES["llava_next"] = HUB_PREFIXES["llava"]
HUB_PREFIXES["qwen2_5_vl"] = HUB_PREFIXES["qwen2_vl"]

# prefixes transformers 5 writes where they differ from both (its CLIP tower has no `vision_model` level)
SAVED_PREFIXES: dict[str, dict[str, str]] = {"llava": {"model.vision_tower.": "vision_tower."}}
SAVED_PREFIXES["llava_next"] = SAVED_PREFIXES["llava"]


def reading_renames(family: str) -> dict[str, str]:
    """Checkpoint prefix -> ours, longest first (so `vision_tower.vision_model.` wins over `vision_tower.`)."""
    renames = {hub: ours for ours, hub in HUB_PREFIXES[family].items()}
    renames.update({saved: ours for ours, saved in SAVED_PREFIXES.get(family, {}).items()})
    renames = {old: new for old, new in renames.items() if old != new}
    return dict(sorted(renames.items(), key=lambda item: -len(item[0])))


def to_hub_names(family: str, names: Mapping[str, T]) -> dict[str, T]:
    """Our tensor names -> the hub's, for writing a checkpoint the way the hub publishes it."""
    prefixes = sorted(HUB_PREFIXES[family].items(), key=lambda item: -len(item[0]))
    out: dict[str, T] = {}
    for name, value in names.items():
        ours = next((p for p, _ in prefixes if name.startswith(p)), None)
        out[name if ours is None else HUB_PREFIXES[family][ours] + name[len(ours):]] = value
    return out
