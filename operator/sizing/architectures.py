"""Architecture numbers of multimodal models (public configs, written in code)
and how many vision tiles and LLM tokens an image of a given size becomes."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    vision_params: float
    vision_tokens_per_tile: int  # patch tokens the ViT runs per tile
    llm_tokens_per_tile: int  # tokens each tile contributes to the prompt
    tile_pixels: int  # side of a square tile (0: native resolution, Qwen2-VL style)
    max_tiles: int  # tiles per image at most (thumbnail included)
    llm_params: float
    llm_layers: int
    llm_hidden: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2

    def tiles(self, width: int, height: int) -> int:
        """Tiles (ViT runs) of one image: dynamic tiling plus a thumbnail, capped."""
        if self.tile_pixels == 0:  # native resolution: count 28x28 merged patches as "tiles" of one token
            return 1
        grid = math.ceil(width / self.tile_pixels) * math.ceil(height / self.tile_pixels)
        return max(1, min(self.max_tiles, grid + (1 if grid > 1 else 0)))

    def image_tokens(self, width: int, height: int) -> int:
        if self.tile_pixels == 0:
            pixels = min(width * height, 12845056)  # Qwen2.5-VL's default max_pixels
            return max(4, pixels // (28 * 28))
        return self.tiles(width, height) * self.llm_tokens_per_tile

    def vision_patch_tokens(self, width: int, height: int) -> int:
        if self.tile_pixels == 0:
            return self.image_tokens(width, height) * 4  # 2x2 patches merge into one LLM token
        return self.tiles(width, height) * self.vision_tokens_per_tile

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.llm_layers * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def llm_weight_bytes(self) -> float:
        return self.llm_params * self.bytes_per_param

    @property
    def vision_weight_bytes(self) -> float:
        return self.vision_params * self.bytes_per_param


ARCHITECTURES: dict[str, Architecture] = {
    # SigLIP-400M at 448 px slices (1024 patches), perceiver resampler to 64 tokens, up to 9 slices + overview; Qwen2-7B
    "minicpm-v-2.6": Architecture("minicpm-v-2.6", 0.4e9, 1024, 64, 448, 10, 7.6e9, 28, 3584, 4, 128),
    # InternViT-300M at 448 px tiles (1025 patches), pixel shuffle to 256 tokens, up to 12 tiles + thumbnail; InternLM2.5-7B
    "internvl2-8b": Architecture("internvl2-8b", 0.3e9, 1025, 256, 448, 13, 7.7e9, 32, 4096, 8, 128),
    # CLIP ViT-L/14 at 336 px (577 patches), 576 tokens, one tile; Vicuna-7B
    "llava-1.5-7b": Architecture("llava-1.5-7b", 0.3e9, 577, 576, 336, 1, 6.7e9, 32, 4096, 32, 128),
    # native-resolution ViT (675M), 2x2 patch merge; Qwen2.5-7B
    "qwen2.5-vl-7b": Architecture("qwen2.5-vl-7b", 0.675e9, 0, 0, 0, 1, 7.6e9, 28, 3584, 4, 128),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCHITECTURES)}") from None
