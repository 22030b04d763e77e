"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT whose token count follows
the image size, and M-RoPE (3-D rotary positions) in the language model, so
prefill must hand decode the rope offset it computed."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..messages import ImageSize
from .adapter import EncodeInput, LanguagePartBase, ModelAdapter, VisionPartBase, decode_image
from .layouts import reading_renames
from .loading import ModuleFactory


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    checkpoint_renames = reading_renames("qwen2_vl")
    vision_class: type[PreTrainedModel] = qwen2.Qwen2VisionTransformerPretrainedModel
    text_class: type[PreTrainedModel] = qwen2.Qwen2VLTextModel
    model_module = qwen2.Qwen2VLModel

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def grid(self, size: ImageSize) -> tuple[int, int, int]:
        """(t, h, w) patch grid the processor produces for an image of this size."""
        proc = self.image_processor
        factor = proc.patch_size * proc.merge_size
        height, width = smart_resize(size.height, size.width, factor=factor,
                                     min_pixels=proc.size["shortest_edge"], max_pixels=proc.size["longest_edge"])
        return 1, height // proc.patch_size, width // proc.patch_size

    def image_items(self, size: ImageSize) -> list[int]:
        t, h, w = self.grid(size)
        return [t * h * w // self.image_processor.merge_size ** 2]

    @classmethod
    def vision_parts(cls, config) -> dict[str, ModuleFactory]:
        return {"model.visual": lambda: cls.vision_class._from_config(config.vision_config)}

    @classmethod
    def language_parts(cls, config) -> dict[str, ModuleFactory]:
        text = config.text_config
        return {"model.language_model": lambda: cls.text_class._from_config(text),
                "lm_head": lambda: nn.Linear(text.hidden_size, text.vocab_size, bias=False)}

    def load_vision(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "Qwen2VLVision":
        return Qwen2VLVision(self, self._load(self.vision_factories(), device, dtype))

    def load_language(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "Qwen2VLLanguage":
        return Qwen2VLLanguage(self, self._load(self.language_factories(), device, dtype))


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    vision_class = qwen25.Qwen2_5_VisionTransformerPretrainedModel
    text_class = qwen25.Qwen2_5_VLTextModel
    model_module = qwen25.Qwen2_5_VLModel


class Qwen2VLVision(VisionPartBase):
    adapter: Qwen2VLAdapter

    def prepare(self, item: EncodeInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's flattened patches and its `[1, 3]` grid."""
        batch = self.adapter.image_processor(images=[decode_image(item.image_bytes)], return_tensors="pt")
        return batch["pixel_values"], batch["image_grid_thw"]

    def encode_prepared(self, prepared: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return self.features(torch.cat([pixels for pixels, _ in prepared]), torch.cat([grid for _, grid in prepared]))

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Merged features of each image from the processor's flattened patches and `[images, 3]` grids."""
        visual = self.parts["model.visual"]
        pixels = pixels.to(device=next(visual.parameters()).device, dtype=self.dtype)
        grid = grid.to(pixels.device)
        merged = visual(pixels, grid_thw=grid, return_dict=True).pooler_output
        sizes = (grid.prod(-1) // self.adapter.image_processor.merge_size ** 2).tolist()
        return list(torch.split(merged, sizes))


class Qwen2VLLanguage(LanguagePartBase):
    adapter: Qwen2VLAdapter
    position_rank = 3

    def prompt_positions(self, input_ids: list[int], image_sizes: Sequence[ImageSize]) -> tuple[torch.Tensor, int]:
        ids = torch.tensor([input_ids])
        if not image_sizes:
            return torch.arange(len(input_ids)).expand(3, -1), 0
        token_types = (ids == self.adapter.image_token_id).int()
        grid = torch.tensor([self.adapter.grid(size) for size in image_sizes])
        # The HF model's own M-RoPE index, so positions match `generate` exactly.
        model_cls = self.adapter.model_module
        holder = SimpleNamespace(config=self.adapter.config,
                                 get_vision_position_ids=partial(model_cls.get_vision_position_ids, None))
        positions, deltas = model_cls.get_rope_index(holder, ids, token_types, image_grid_thw=grid)
        return positions[:, 0], int(deltas[0, 0])

