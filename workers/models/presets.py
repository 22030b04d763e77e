"""Built-in presets: small random-weight models with locally built tokenizers.

A preset is materialised once into a cache directory in standard Hugging Face
format, under a file lock, then loaded like any local model. Every process
(encode, prefill, decode, and a test's reference `generate`) therefore sees
the same weights."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    PreTrainedModel,
    Qwen2VLConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tokenizer import LLAVA_TOKENS, QWEN_TOKENS, TokenizerSpec, build_tokenizer

PRESET_VERSION = "v2"


@dataclass(frozen=True)
class Preset:
    name: str
    tokens: TokenizerSpec
    build: Callable[[int], tuple[PreTrainedModel, Any]]  # vocab size -> (model, image processor)
    seed: int = 0


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _clip(hidden: int, layers: int, heads: int, inter: int, image: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image, patch_size=patch, projection_dim=hidden)


def _clip_processor(cls, image: int, **extra):
    return cls(size={"shortest_edge": image}, crop_size={"height": image, "width": image}, **extra)


def _tiny_llava(vocab: int):
    from transformers import LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_clip(64, 2, 4, 128, 32, 8), text_config=_llama(vocab, 64, 2, 4, 2, 128),
                         image_token_id=4, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    return LlavaForConditionalGeneration(config), _clip_processor(CLIPImageProcessorPil, 32)


def _small_llava(vocab: int):
    """LLaVA-1.5-7B's shape scaled down: ~24:1 language-to-vision FLOPs per image
    at a 576+-token prompt, like CLIP ViT-L/14-336 in front of a 7B Llama."""
    from transformers import LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_clip(256, 6, 4, 1024, 112, 14),
                         text_config=_llama(vocab, 512, 8, 8, 8, 1536),
                         image_token_id=4, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    return LlavaForConditionalGeneration(config), _clip_processor(CLIPImageProcessorPil, 112)


def _tiny_llava_next(vocab: int):
    from transformers import LlavaNextForConditionalGeneration

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=_clip(64, 2, 4, 128, 32, 8), text_config=_llama(vocab, 64, 2, 4, 2, 128),
                             image_token_id=4, vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints, tie_word_embeddings=False)
    processor = _clip_processor(LlavaNextImageProcessorPil, 32, image_grid_pinpoints=pinpoints)
    return LlavaNextForConditionalGeneration(config), processor


def _tiny_qwen2_vl(vocab: int):
    from transformers import Qwen2VLForConditionalGeneration

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=5, video_token_id=6,
                           vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=False)
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                         temporal_patch_size=2)
    return Qwen2VLForConditionalGeneration(config), processor


PRESETS: dict[str, Preset] = {
    "tiny-llava": Preset("tiny-llava", LLAVA_TOKENS, _tiny_llava),
    "small-llava": Preset("small-llava", LLAVA_TOKENS, _small_llava),
    "tiny-llava-next": Preset("tiny-llava-next", LLAVA_TOKENS, _tiny_llava_next),
    "tiny-qwen2-vl": Preset("tiny-qwen2-vl", QWEN_TOKENS, _tiny_qwen2_vl),
}


def cache_root() -> Path:
    return Path(os.environ.get("EPD_MODEL_CACHE", Path.home() / ".cache" / "epd" / "models"))


def materialize(name: str) -> Path:
    """Directory of the preset in HF format, built once (safe across processes)."""
    preset = PRESETS[name]
    target = cache_root() / f"{name}-{PRESET_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _build(preset, target)
    return target


def _build(preset: Preset, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=target.parent))
    try:
        tokenizer = build_tokenizer(preset.tokens, staging)
        torch.manual_seed(preset.seed)
        model, processor = preset.build(len(tokenizer))
        _check_special_ids(model, tokenizer)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_special_ids(model: PreTrainedModel, tokenizer) -> None:
    """The config's placeholder ids must be the tokenizer's (they are fixed by the token order)."""
    config = model.config
    names = {"image_token_id": ("<image>", "<|image_pad|>"), "vision_start_token_id": ("<|vision_start|>",)}
    for attr, tokens in names.items():
        expected = getattr(config, attr, None)
        if expected is None:
            continue
        actual = [tokenizer.convert_tokens_to_ids(t) for t in tokens if t in tokenizer.get_vocab()]
        if expected not in actual:
            raise AssertionError(f"{attr}={expected} does not match tokenizer ids {actual}")
