"""Fixtures for the engine tests: presets, stage parts and the full reference model."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from epd.workers.models import ModelAdapter, load_adapter


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A deterministic noisy PNG (noise so different images give different embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Stages:
    adapter: ModelAdapter
    vision: object
    language: object
    full: torch.nn.Module


@pytest.fixture(scope="session", params=["tiny-llava", "tiny-qwen2-vl", "tiny-llava-next"])
def stages(request) -> Stages:
    adapter = load_adapter(request.param)
    return Stages(adapter, adapter.load_vision(), adapter.load_language(), adapter.load_full())
