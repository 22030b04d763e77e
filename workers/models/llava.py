"""LLaVA-1.5 and LLaVA-NeXT (anyres tiles): CLIP-style vision tower + MLP
projector in front of a Llama-style language model."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from ..dynamo_limits import allow_graphs
from ..messages import ImageSize
from .adapter import EncodeInput, LanguagePartBase, ModelAdapter, VisionPartBase, decode_image
from .layouts import reading_renames
from .loading import ModuleFactory


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_class = LlavaForConditionalGeneration
    checkpoint_renames = reading_renames("llava")

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def tokens_per_tile(self) -> int:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        cls = 1 if self.config.vision_feature_select_strategy == "full" else 0
        return side * side + cls

    def image_items(self, size: ImageSize) -> list[int]:
        return [self.tokens_per_tile]

    @classmethod
    def vision_parts(cls, config) -> dict[str, ModuleFactory]:
        return {"model.vision_tower": lambda: AutoModel.from_config(config.vision_config),
                "model.multi_modal_projector": lambda: LlavaMultiModalProjector(config)}

    @classmethod
    def language_parts(cls, config) -> dict[str, ModuleFactory]:
        text = config.text_config
        return {"model.language_model": lambda: AutoModel.from_config(text),
                "lm_head": lambda: nn.Linear(text.hidden_size, text.vocab_size, bias=False)}

    def load_vision(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "LlavaVision":
        return LlavaVision(self, self._load(self.vision_factories(), device, dtype))

    def load_language(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "LlavaLanguage":
        return LlavaLanguage(self, self._load(self.language_factories(), device, dtype))

    def pixel_values(self, item: EncodeInput) -> torch.Tensor:
        """[3, H, W] pixels of one item."""
        image = decode_image(item.image_bytes)
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class LlavaVision(VisionPartBase):
    """The tower keeps only the layers up to the deepest one the features are taken from (LLaVA takes the
    second-to-last: computing the last layer of CLIP ViT-L/14 would cost 1/24 of the tower for nothing)."""

    adapter: LlavaAdapter

    def __init__(self, adapter: ModelAdapter, parts: dict[str, nn.Module]) -> None:
        super().__init__(adapter, parts)
        layers = _encoder_layers(parts["model.vision_tower"])
        selected = self.adapter.config.vision_feature_layer
        # hidden_states[i] is the input of layer i (0: the embeddings), so index -1 is after the last layer
        self.feature_layers = [index % (len(layers) + 1)
                               for index in (selected if isinstance(selected, (list, tuple)) else [selected])]
        keep = max(self.feature_layers)
        unused = {id(param) for layer in layers[keep:] for param in layer.parameters()}
        self.dropped = frozenset(f"model.vision_tower.{name}"
                                 for name, param in parts["model.vision_tower"].named_parameters() if id(param) in unused)
        del layers[keep:]
        self.projection: Callable[[torch.Tensor], torch.Tensor] = self._project  # compiled by `compile`

    @torch.no_grad()
    def prepare(self, item: EncodeInput) -> torch.Tensor:
        return self.adapter.pixel_values(item)

    def encode_prepared(self, prepared: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.features(torch.stack(list(prepared))).unbind(0))

    def compile(self) -> bool:
        """Every item is a square of the tower's input size, so compiling for several items (the count dynamic)
        and for a single item (Dynamo specialises size 1) covers every batch."""
        allow_graphs()
        self.projection = torch.compile(self._project)
        side = int(self.adapter.config.vision_config.image_size)
        weight = next(self.parts["model.vision_tower"].parameters())
        several = weight.new_zeros((2, 3, side, side))
        torch._dynamo.mark_dynamic(several, 0)
        for pixels in (several, weight.new_zeros((1, 3, side, side))):
            self.features(pixels)
        self.compiled = True
        return True

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[items, tokens, hidden]` projected features of preprocessed `[items, 3, H, W]` pixels."""
        tower = self.parts["model.vision_tower"]
        return self.projection(pixels.to(device=next(tower.parameters()).device, dtype=self.dtype))

    def _project(self, pixels: torch.Tensor) -> torch.Tensor:
        """The feature layers' hidden states through the projector (what `projection` runs, eager or compiled)."""
        hidden = self.parts["model.vision_tower"](pixels, output_hidden_states=True, return_dict=True).hidden_states
        pool = [hidden[index] for index in self.feature_layers]
        if self.adapter.config.vision_feature_select_strategy == "default":
            pool = [h[:, 1:] for h in pool]
        return self.parts["model.multi_modal_projector"](torch.cat(pool, dim=-1))


class LlavaLanguage(LanguagePartBase):
    def prompt_positions(self, input_ids: list[int], image_sizes: Sequence[ImageSize]) -> tuple[torch.Tensor, int]:
        return torch.arange(len(input_ids)), 0


class _ImageNewline(nn.Module):
    """Holds LLaVA-NeXT's learned end-of-row embedding (checkpoint key model.image_newline)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.image_newline = nn.Parameter(torch.empty(hidden_size))


_recent_tiles = threading.local()  # per thread: (adapter, image bytes, every item's pixels) of its last image


class LlavaNextAdapter(LlavaAdapter):
    """Anyres: a base view plus a grid of tiles, each tile encoded independently,
    so the tiles of one large image can be spread over several encode workers."""

    family = "llava_next"
    model_class = LlavaNextForConditionalGeneration

    def num_tiles(self, size: ImageSize) -> int:
        """Items of an image: the base view + its anyres tiles."""
        return int(image_size_to_num_patches((size.height, size.width), self.config.image_grid_pinpoints,
                                             self.config.vision_config.image_size))

    def image_items(self, size: ImageSize) -> list[int]:
        return [self.tokens_per_tile] * self.num_tiles(size)

    def image_tokens(self, size: ImageSize) -> int:
        vision = self.config.vision_config
        patches = vision.image_size // vision.patch_size
        empty = [torch.empty(self.num_tiles(size), patches * patches, 1, device="meta")]
        packed, _ = _pack(self.config, empty, size, torch.empty(1, device="meta"))
        return int(packed[0].shape[0])

    @classmethod
    def language_parts(cls, config) -> dict[str, ModuleFactory]:
        return {**super().language_parts(config), "model": lambda: _ImageNewline(config.text_config.hidden_size)}

    def load_language(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "LlavaNextLanguage":
        return LlavaNextLanguage(self, self._load(self.language_factories(), device, dtype))

    def pixel_values(self, item: EncodeInput) -> torch.Tensor:
        tiles = self._all_tiles(item.image_bytes)
        index = max(item.tile_index, 0)
        if index >= tiles.shape[0]:
            raise ValueError(f"tile {item.tile_index} out of range: the image has {tiles.shape[0]} items")
        return tiles[index]

    def _all_tiles(self, image_bytes: bytes) -> torch.Tensor:
        """Every item's pixels of one image. The processor makes all of them at once, and an image's items
        come to a helper thread one after another (the encode worker never splits an image between threads),
        so each thread keeps its last image's, and the image's other items (a 672x672 image has five) cost no
        further run."""
        last = getattr(_recent_tiles, "last", None)
        if last is not None and last[0] is self and last[1] == image_bytes:  # bytes compare in C
            return last[2]
        tiles = self.image_processor(images=[decode_image(image_bytes)], return_tensors="pt")["pixel_values"][0]
        _recent_tiles.last = (self, image_bytes, tiles)
        return tiles


def _pack(config, features: list[torch.Tensor], size: ImageSize, newline: torch.Tensor):
    """LLaVA-NeXT's own packing (unpad + newline per row) for one image."""
    holder = SimpleNamespace(config=config)
    sizes = torch.tensor([[size.height, size.width]])
    return LlavaNextModel.pack_image_features(holder, features, sizes, config.vision_feature_select_strategy,
                                              newline)


class LlavaNextLanguage(LlavaLanguage):
    def merge_image(self, size: ImageSize, item_embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        newline = cast(torch.Tensor, self.parts["model"].image_newline)
        packed, _ = _pack(self.adapter.config, [torch.stack(list(item_embeddings))], size, newline)
        return packed[0]


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP- or SigLIP-style vision tower."""
    model: Any = getattr(tower, "vision_model", tower)
    return cast(nn.ModuleList, model.encoder.layers)
