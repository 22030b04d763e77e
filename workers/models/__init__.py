"""Model families split into a vision part (encode) and a language part
(prefill/decode), plus built-in random-weight presets."""

from __future__ import annotations

import json
from pathlib import Path

from . import download
from .adapter import (
    EncodeInput,
    InvalidImageError,
    LanguagePartBase,
    ModelAdapter,
    UnknownModelError,
    VisionPartBase,
    decode_image,
)
from .llava import LlavaAdapter, LlavaNextAdapter
from .presets import PRESETS, materialize
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
}

__all__ = ["ADAPTERS", "EncodeInput", "InvalidImageError", "LanguagePartBase", "ModelAdapter", "PRESETS",
           "UnknownModelError", "VisionPartBase", "decode_image", "load_adapter", "resolve_model_dir"]


def resolve_model_dir(model: str) -> Path:
    """A preset name, a local HF-format directory, or a hub id already in the local HF cache."""
    if model in PRESETS:
        return materialize(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnknownModelError(f"model directory {model!r} has no config.json")
        return path
    downloaded = download.prepared(model)  # fetched at start (EPD_MODEL_DOWNLOAD=1), this stage's view
    if downloaded is not None:
        return downloaded
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # any hub failure means: not available here
        raise UnknownModelError(
            f"unknown model {model!r}: not a built-in preset ({', '.join(PRESETS)}), not a local directory, "
            f"and not in the local Hugging Face cache ({type(exc).__name__})") from exc


def load_adapter(model: str) -> ModelAdapter:
    """The light adapter (tokenizer, processor, config; no weights) of a model."""
    model_dir = resolve_model_dir(model)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    adapter_cls = ADAPTERS.get(model_type)
    if adapter_cls is None:
        raise UnknownModelError(f"model {model!r} has type {model_type!r}; supported: {', '.join(ADAPTERS)}")
    return adapter_cls(model_dir, model_id=model)
