"""Deterministic noise images: what the benchmark sends and `epd profile`
encodes. Noise, so that no two seeds give alike images (a cache never confuses
them) and PNG compression cannot shrink the work away."""

from __future__ import annotations

import base64
import io
import random


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A width x height RGB PNG of seeded random pixels."""
    from PIL import Image  # only callers that make images pay for Pillow

    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def noise_png_data_url(width: int, height: int, seed: int) -> str:
    """`noise_png` as a `data:image/png;base64,...` URL, as an OpenAI chat request carries it."""
    return "data:image/png;base64," + base64.b64encode(noise_png(width, height, seed)).decode()
