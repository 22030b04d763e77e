"""Small helpers every test tier shares: waiting on a condition, test images."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from PIL import Image

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def eventually(condition: Callable[[], T], within: float = 30.0, message: str = "condition") -> T:
    """`wait_until` inside an event loop: other tasks run while `condition` is polled for `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(0.01)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A deterministic noisy PNG (noise, so different images give different embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return buffer.getvalue()
