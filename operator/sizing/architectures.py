"""Architecture numbers of multimodal models (public configs and model cards,
written in code: nothing here reaches a model hub) and how many vision tiles
and LLM tokens an image of a given size becomes.

Parameter counts are the published ones (they set weight bytes and FLOPs);
the layer shapes set activation and KV-cache bytes. A test checks that the
shapes add up to the published counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Intermediate-width tensors alive at the MLP's peak, by activation: GELU keeps fc1's output and the GELU's;
# quick-GELU (x * sigmoid(1.702 x)) one more temporary; SwiGLU act(gate), up and their product.
MLP_LIVE_TENSORS = {"gelu": 2, "quick_gelu": 3, "swiglu": 3}


@dataclass(frozen=True)
class Tower:
    """Shape of one transformer stack (a vision tower or a language model)."""

    params: float  # published parameter count
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    activation: str  # the MLP's: "gelu", "quick_gelu" (fc1 -> act -> fc2) or "swiglu" (gate, up, down)

    def __post_init__(self) -> None:
        if self.activation not in MLP_LIVE_TENSORS:
            raise ValueError(f"activation must be one of {', '.join(MLP_LIVE_TENSORS)}, got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_live_tensors(self) -> int:
        return MLP_LIVE_TENSORS[self.activation]


@dataclass(frozen=True)
class Architecture:
    name: str
    vision: Tower
    projector_params: float  # resampler / MLP projector, loaded with the vision tower
    vision_tokens_per_tile: int  # patch tokens the ViT runs per tile
    llm_tokens_per_tile: int  # tokens each tile contributes to the prompt
    tile_pixels: int  # side of a square tile (0: native resolution, Qwen2-VL style)
    max_tiles: int  # tiles per image at most (thumbnail included)
    llm: Tower
    vocab: int
    max_context: int  # the language model's context window (tokens)
    bytes_per_param: int = 2
    max_pixels: int = 0  # native resolution: images are downscaled to at most this many pixels

    def tiles(self, width: int, height: int) -> int:
        """Tiles (ViT runs) of one image: dynamic tiling plus a thumbnail, capped."""
        if self.tile_pixels == 0:  # native resolution: the whole image is one ViT sequence
            return 1
        grid = math.ceil(width / self.tile_pixels) * math.ceil(height / self.tile_pixels)
        return max(1, min(self.max_tiles, grid + (1 if grid > 1 else 0)))

    def image_tokens(self, width: int, height: int) -> int:
        if self.tile_pixels == 0:
            return max(4, min(width * height, self.max_pixels) // (28 * 28))  # 2x2 merged 14 px patches
        return self.tiles(width, height) * self.llm_tokens_per_tile

    def vision_patch_tokens(self, width: int, height: int) -> int:
        if self.tile_pixels == 0:
            return self.image_tokens(width, height) * 4  # 2x2 patches merge into one LLM token
        return self.tiles(width, height) * self.vision_tokens_per_tile

    def tile_token_squares(self, width: int, height: int) -> int:
        """Sum over the image's ViT sequences of length squared (the size of full attention scores)."""
        if self.tile_pixels == 0:
            return self.vision_patch_tokens(width, height) ** 2
        return self.tiles(width, height) * self.vision_tokens_per_tile ** 2

    def largest_image(self) -> tuple[int, int]:
        """An image that reaches the most tiles (or pixels) the preprocessor produces: the worst case an
        engine reserves activation memory for."""
        if self.tile_pixels == 0:
            side = math.isqrt(self.max_pixels)
            return side, side
        side = self.tile_pixels * math.ceil(math.sqrt(self.max_tiles))
        return side, side

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.llm.layers * self.llm.kv_heads * self.llm.head_dim * self.bytes_per_param

    @property
    def llm_weight_bytes(self) -> float:
        return self.llm.params * self.bytes_per_param

    @property
    def vision_weight_bytes(self) -> float:
        return (self.vision.params + self.projector_params) * self.bytes_per_param


ARCHITECTURES: dict[str, Architecture] = {
    # openbmb/MiniCPM-V-2_6: "SigLip-400M and Qwen2-7B with a total of 8B parameters".
    # Vision (vision_config): 27 layers, hidden 1152, MLP 4304 (tanh GELU), 16 heads, patch 14; slices of about
    # 448x448 (slice_config.scale_resolution) -> 32x32 = 1024 patches. Up to 9 slices
    # (max_slice_nums) plus the overview image: 10 per image; a 4032x3024 photo is sliced 3x3 + 1.
    # Resampler: 64 queries (query_num) of width 3584, one cross-attention layer (~68M params).
    # Language model Qwen2-7B: 7.6B params, 28 layers, hidden 3584, MLP 18944, 28 heads, 4 KV heads,
    # vocab 151666, 32768-token context.
    "minicpm-v-2.6": Architecture(
        "minicpm-v-2.6", Tower(0.4e9, 27, 1152, 4304, 16, 16, "gelu"), 0.068e9, 1024, 64, 448, 10,
        Tower(7.6e9, 28, 3584, 18944, 28, 4, "swiglu"), 151666, 32768),
    # OpenGVLab/InternVL2-8B: InternViT-300M-448px + MLP projector + internlm2_5-7b-chat, 8.08B total.
    # InternViT-300M: 0.3B params, 24 layers, hidden 1024, MLP 4096 (GELU), 16 heads, patch 14 at 448 px:
    # 1024 patches + CLS = 1025 tokens per tile; pixel shuffle (downsample_ratio 0.5) -> 256 tokens.
    # Dynamic tiling up to 12 tiles (max_dynamic_patch) + a thumbnail: 13 tiles for 4032x3024 (4x3 grid).
    # Projector: LayerNorm + 4096x4096 + 4096x4096 (34M). InternLM2.5-7B: 7.7B params, 32 layers,
    # hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 92553, 32768-token context.
    "internvl2-8b": Architecture(
        "internvl2-8b", Tower(0.3e9, 24, 1024, 4096, 16, 16, "gelu"), 0.034e9, 1025, 256, 448, 13,
        Tower(7.7e9, 32, 4096, 14336, 32, 8, "swiglu"), 92553, 32768),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (0.3B, 24 layers, hidden 1024, MLP 4096 quick-GELU, 16 heads,
    # 576 patches + CLS), a 2-layer MLP projector 1024->4096->4096 (21M), Vicuna-7B v1.5 (6.7B, 32 layers,
    # hidden 4096, MLP 11008, 32 heads = 32 KV heads, vocab 32064, 4096-token context). One tile per image.
    "llava-1.5-7b": Architecture(
        "llava-1.5-7b", Tower(0.3e9, 24, 1024, 4096, 16, 16, "quick_gelu"), 0.021e9, 577, 576, 336, 1,
        Tower(6.7e9, 32, 4096, 11008, 32, 32, "swiglu"), 32064, 4096),
    # Qwen/Qwen2.5-VL-7B-Instruct: native-resolution ViT (0.675B with its merger, depth 32, hidden 1280,
    # SwiGLU MLP 3420, 16 heads, patch 14, 2x2 merge), at most 12845056 pixels per image (max_pixels);
    # Qwen2.5-7B (7.6B, 28 layers, hidden 3584, MLP 18944, 28 heads, 4 KV heads, vocab 152064,
    # 128000 positions).
    "qwen2.5-vl-7b": Architecture(
        "qwen2.5-vl-7b", Tower(0.63e9, 32, 1280, 3420, 16, 16, "swiglu"), 0.045e9, 0, 0, 0, 1,
        Tower(7.6e9, 28, 3584, 18944, 28, 4, "swiglu"), 152064, 128000, max_pixels=12845056),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCHITECTURES)}") from None
