"""The model-family interface every stage uses.

An adapter is light (config, tokenizer, image processor; no weights): the router
uses it to build prompts and count image tokens. Each stage asks it for only
its own part: `load_vision()` (encode) or `load_language()` (prefill/decode)."""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedModel

from ..messages import ChatMessage, ImagePart, ImageSize, TextPart
from .loading import ModuleFactory, build_parts, load_parts, parameter_bytes


class UnknownModelError(ValueError):
    """The model name is neither a preset, a local model directory, nor a cached hub id."""


class InvalidImageError(ValueError):
    """The bytes are not a decodable image."""


@dataclass(frozen=True)
class EncodeInput:
    """One independently encodable item: a whole image (tile -1) or one anyres tile."""

    image_bytes: bytes
    tile_index: int = -1


# Pillow's own decompression-bomb bound (twice its MAX_IMAGE_PIXELS default), checked here rather than
# through that process-wide setting, which the router lifts for its own limits.
MAX_DECODED_PIXELS = 2 * 89_478_485


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB, raising InvalidImageError with the reason."""
    try:
        image = Image.open(io.BytesIO(data))
        pixels = image.width * image.height
        if pixels <= MAX_DECODED_PIXELS:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"cannot decode image: {exc}") from exc
    if pixels > MAX_DECODED_PIXELS:
        raise InvalidImageError(f"cannot decode image: {image.width}x{image.height} pixels could be a "
                                f"decompression bomb (at most {MAX_DECODED_PIXELS} are decoded)")
    return image.convert("RGB")


class ModelAdapter(ABC):
    """One model family's split into a vision part and a language part."""

    family: str
    model_class: type[PreTrainedModel]
    # legacy checkpoint prefix -> current prefix (hub checkpoints predating transformers 5)
    checkpoint_renames: dict[str, str] = {}

    def __init__(self, model_dir: Path, model_id: str) -> None:
        self.model_dir = model_dir
        self.model_id = model_id
        self.config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)

    # ---- light, router-side ------------------------------------------------
    @cached_property
    def processor_fingerprint(self) -> str:
        """Hash of the image-processor settings: part of every multimodal cache key."""
        settings = json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    @property
    def text_config(self) -> Any:
        return self.config.text_config

    # read for every generated token: computed once (the config and tokenizer do not change)
    @cached_property
    def max_context(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (int(eos),)

    @cached_property
    def token_decoder(self) -> Any:
        """What detokenizes generated tokens: the Rust tokenizer behind a fast one (a third of the cost per
        call, paid twice per token), which decodes the same text unless the tokenizer cleans up spaces
        afterwards; otherwise the tokenizer itself."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(self.tokenizer, "clean_up_tokenization_spaces", False)
        return backend if backend is not None and not cleans_up else self.tokenizer

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """The placeholder token id that image embeddings replace."""

    @abstractmethod
    def image_items(self, size: ImageSize) -> list[int]:
        """Embedding rows of each independently encodable item of an image of this size."""

    def image_tokens(self, size: ImageSize) -> int:
        """Placeholder tokens the image occupies in the prompt."""
        return sum(self.image_items(size))

    def build_prompt(self, messages: Sequence[ChatMessage], image_sizes: Sequence[ImageSize],
                     add_generation_prompt: bool = True,
                     tokenize: Callable[[str], list[int]] | None = None) -> list[int]:
        """Apply the chat template and expand each image placeholder to its token count.
        `tokenize` turns the rendered text into ids (the router's keeps user text plain)."""
        rendered = [{"role": m.role, "content": [_template_part(p) for p in m.parts]} for m in messages]
        text = self.tokenizer.apply_chat_template(rendered, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        ids = tokenize(text) if tokenize else self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.tokenizer.bos_token_id is not None and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id, *ids]
        expanded: list[int] = []
        sizes = iter(image_sizes)
        for token in ids:
            if token == self.image_token_id:
                size = next(sizes, None)
                if size is None:
                    raise ValueError("the prompt has more image placeholders than images")
                expanded.extend([token] * self.image_tokens(size))
            else:
                expanded.append(token)
        if next(sizes, None) is not None:
            raise ValueError("more images than image placeholders in the prompt")
        return expanded

    # ---- stage parts -------------------------------------------------------
    @classmethod
    @abstractmethod
    def vision_parts(cls, config: Any) -> dict[str, ModuleFactory]:
        """Checkpoint prefix -> module factory of the vision tower + projector."""

    @classmethod
    @abstractmethod
    def language_parts(cls, config: Any) -> dict[str, ModuleFactory]:
        """Checkpoint prefix -> module factory of the language model (+ lm_head)."""

    def vision_factories(self) -> dict[str, ModuleFactory]:
        return self.vision_parts(self.config)

    def language_factories(self) -> dict[str, ModuleFactory]:
        return self.language_parts(self.config)

    def tied_parameters(self) -> dict[str, str]:
        if getattr(self.text_config, "tie_word_embeddings", False) or getattr(self.config, "tie_word_embeddings", False):
            return {"lm_head.weight": "model.language_model.embed_tokens.weight"}
        return {}

    def _load(self, factories: dict[str, ModuleFactory], device: str, dtype: torch.dtype | None) -> dict[str, nn.Module]:
        parts = build_parts(factories, device, dtype or self.default_dtype)
        load_parts(parts, self.model_dir, self.checkpoint_renames, self.tied_parameters())
        for module in parts.values():
            module.eval().requires_grad_(False)  # serving only: no tensor computed from the weights tracks grad
        return parts

    @property
    def default_dtype(self) -> torch.dtype:
        dtype = getattr(self.config, "dtype", None) or getattr(self.text_config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return dtype or torch.float32

    @abstractmethod
    def load_vision(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "VisionPartBase":
        """The encode stage's part: vision tower + projector only."""

    @abstractmethod
    def load_language(self, device: str = "cpu", dtype: torch.dtype | None = None) -> "LanguagePartBase":
        """The prefill/decode stages' part: the language model only."""

    def load_full(self, device: str = "cpu", dtype: torch.dtype | None = None) -> PreTrainedModel:
        """The whole Hugging Face model (reference for tests, and the colocated mode)."""
        model = self.model_class.from_pretrained(self.model_dir, dtype=dtype or self.default_dtype)
        return model.to(device).eval()

    @classmethod
    def stage_parameter_bytes(cls, config: Any, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
        """Parameter bytes each stage loads for a config, counted on the meta device (nothing allocated).
        Prefill and decode both hold the language part."""
        return {"encode": parameter_bytes(cls.vision_parts(config), dtype),
                "prefill": parameter_bytes(cls.language_parts(config), dtype),
                "decode": parameter_bytes(cls.language_parts(config), dtype)}


def _template_part(part: TextPart | ImagePart) -> dict[str, str]:
    return {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}


class VisionPartBase(ABC):
    """Vision tower + projector of one family; batches items across requests."""

    # checkpoint parameters this part loads and then frees, as its features never use them
    dropped: frozenset[str] = frozenset()

    def __init__(self, adapter: ModelAdapter, parts: dict[str, nn.Module]) -> None:
        self.adapter = adapter
        self.parts = parts
        self.compiled = False  # the tower and projector run as TorchInductor graphs (see `compile`)

    def compile(self) -> bool:
        """From now on run the tower and projector compiled by TorchInductor, every graph made here on
        zero inputs (never under a batch); False, and nothing changed, where the family's tower stays eager."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.parts.values())).parameters().__next__().dtype

    @abstractmethod
    def prepare(self, item: EncodeInput) -> Any:
        """One item decoded and preprocessed (CPU work, no model: the encode server runs it beside the
        compute thread); raises InvalidImageError for bytes that are not an image."""

    @abstractmethod
    def encode_prepared(self, prepared: Sequence[Any]) -> list[torch.Tensor]:
        """One [n_tokens, hidden] tensor per prepared item, computed as one batch."""

    def encode(self, items: Sequence[EncodeInput]) -> list[torch.Tensor]:
        """One [n_tokens, hidden] tensor per item, computed as one batch."""
        return self.encode_prepared([self.prepare(item) for item in items])


class LanguagePartBase(ABC):
    """The language model of one family, driven by the prefill and decode engines."""

    def __init__(self, adapter: ModelAdapter, parts: dict[str, nn.Module]) -> None:
        self.adapter = adapter
        self.text_model: PreTrainedModel = parts["model.language_model"]
        self.lm_head = cast(nn.Linear, parts["lm_head"])
        self.parts = parts

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def hidden_size(self) -> int:
        return int(self.adapter.text_config.hidden_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.get_input_embeddings()(input_ids)

    def merge_image(self, size: ImageSize, item_embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows that fill one image's placeholders, from its items' embeddings (in order)."""
        return torch.cat(list(item_embeddings), dim=0)

    position_rank = 1  # rows of a token's position id: 1 (RoPE) or 3 (M-RoPE: time, height, width)

    @abstractmethod
    def prompt_positions(self, input_ids: list[int], image_sizes: Sequence[ImageSize]) -> tuple[torch.Tensor, int]:
        """Position ids of a prompt (`[L]`, or `[3, L]` for M-RoPE) and the rope delta for later tokens."""

    def text_positions(self, start: int, count: int, rope_delta: int) -> torch.Tensor:
        """Position ids of `count` text tokens after the prompt, the first at cache index `start`."""
        positions = torch.arange(start + rope_delta, start + rope_delta + count)
        return positions if self.position_rank == 1 else positions.expand(self.position_rank, count)

    def text_positions_of(self, positions: list[int]) -> torch.Tensor:
        """Position ids of one text token per sequence at these (rope-delta applied) positions."""
        ids = torch.tensor(positions, dtype=torch.long)
        return ids if self.position_rank == 1 else ids.expand(self.position_rank, len(positions))

    def rotary_position_ids(self, packed: torch.Tensor) -> torch.Tensor:
        """The rotary module's position ids for a packed batch: `[1, T]` or `[3, 1, T]`."""
        return packed.view(1, -1) if self.position_rank == 1 else packed.view(self.position_rank, 1, -1)
