"""Content-derived cache keys: never request-derived, so a multi-turn chat that
resends an image hits the cache."""

from __future__ import annotations

import hashlib


def image_key(model_id: str, processor_fingerprint: str, image: bytes) -> str:
    """hash(model id, processor settings, image bytes)."""
    digest = hashlib.sha256()
    for part in (model_id.encode(), b"\0", processor_fingerprint.encode(), b"\0", image):
        digest.update(part)
    return digest.hexdigest()[:32]


def item_key(image: str, tile_index: int) -> str:
    """Key of one encodable item of an image (the whole image when tile_index < 0)."""
    return image if tile_index < 0 else f"{image}.t{tile_index}"
