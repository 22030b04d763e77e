"""Fixtures for the engine tests: presets, stage parts and the full reference model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from epd.workers.models import ModelAdapter, load_adapter

from ..helpers import png_bytes  # noqa: F401  (re-exported for the engine tests)


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
