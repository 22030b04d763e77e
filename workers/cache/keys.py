"""Content-derived cache keys: never request-derived, so a multi-turn chat that
resends an image hits the cache. Images and their tiles name embeddings; chained
block hashes name prompt prefixes (prefill's KV cache, the router's affinity)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def image_key(model_id: str, processor_fingerprint: str, image: bytes) -> str:
    """hash(model id, processor settings, image bytes)."""
    digest = hashlib.sha256()
    for part in (model_id.encode(), b"\0", processor_fingerprint.encode(), b"\0", image):
        digest.update(part)
    return digest.hexdigest()[:32]


def item_key(image: str, tile_index: int) -> str:
    """Key of one encodable item of an image (the whole image when tile_index < 0)."""
    return image if tile_index < 0 else f"{image}.t{tile_index}"


def block_hashes(input_ids: Sequence[int], image_token_id: int, image_keys: Sequence[str],
                 image_rows: Sequence[int], block_size: int) -> list[str]:
    """Chained hashes of the prompt's full blocks; a block holding image rows of an image
    without a content key ends the chain (its content cannot be named)."""
    owners: list[tuple[str, int]] = []  # (image key, row) of each placeholder, in prompt order
    for key, rows in zip(image_keys, image_rows, strict=False):  # images past the keys have none
        owners.extend((key, row) for row in range(rows))
    slot = 0
    hashes: list[str] = []
    previous = b""
    for start in range(0, len(input_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        for token in input_ids[start:start + block_size]:
            if token == image_token_id:
                if slot >= len(owners):
                    return hashes
                key, row = owners[slot]
                digest.update(f"<{key}:{row}>".encode())
                slot += 1
            else:
                digest.update(b"%d," % token)
        previous = digest.digest()
        hashes.append(previous.hex())
    return hashes
