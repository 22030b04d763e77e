"""Prefix KV cache of the prefill worker: the KV of prompt blocks already
computed, found again by a chained hash of the block's content.

A block's identity covers its text token ids and, for image placeholders, the
image's content key and row offset, so two prompts share a block exactly when
everything up to and including it is the same text and the same images. A
multi-turn chat or a repeated image then skips the language-model prefill of
everything it has seen before, which an embedding cache alone cannot do
(the vision tower is a few percent of LLaVA's prefill compute)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import ByteLRU

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer ([heads, seq, dim] keys, values)


@dataclass
class PrefixHit:
    """Leading blocks of a prompt found in the cache. Holding it pins their tensors, so a
    later eviction does not take them from a request that already counted on them."""

    tokens: int
    blocks: list[torch.Tensor]  # [layers, 2, heads, block, dim] each, in prompt order

    def layers(self) -> KVLayers:
        stacked = torch.cat(self.blocks, dim=3)
        return [(layer[0], layer[1]) for layer in stacked]


def images_within(input_ids: Sequence[int], image_token_id: int, image_rows: Sequence[int],
                  tokens: int) -> list[bool]:
    """For each image, whether all its placeholder rows lie in the first `tokens` prompt tokens
    (a prefix hit then makes its embedding unnecessary)."""
    slots = [position for position, token in enumerate(input_ids) if token == image_token_id]
    within, first = [], 0
    for rows in image_rows:
        within.append(rows == 0 or (first + rows <= len(slots) and slots[first + rows - 1] < tokens))
        first += rows
    return within


class PrefixKVCache:
    """Block KV tensors ([layers, 2, heads, block, dim]) in a byte-bounded LRU. The prefill
    server looks up on its event loop and the engine stores from its compute thread."""

    def __init__(self, capacity_bytes: int, block_size: int = 16) -> None:
        if block_size <= 0:
            raise ValueError(f"prefix cache block size must be > 0, got {block_size}")
        self.block_size = block_size
        self.blocks = ByteLRU(capacity_bytes)
        self._lock = threading.Lock()

    def lookup(self, hashes: Sequence[str], prompt_tokens: int) -> PrefixHit | None:
        """The longest cached run of leading blocks, leaving at least one prompt token to compute
        (its logits give the first token)."""
        usable = min(len(hashes), (prompt_tokens - 1) // self.block_size)
        found = []
        with self._lock:
            for digest in hashes[:usable]:
                block = self.blocks.get(digest)
                if block is None:
                    break
                found.append(block)
        return PrefixHit(len(found) * self.block_size, found) if found else None

    def store(self, hashes: Sequence[str], layers: KVLayers) -> None:
        """Keep each full block of a prompt's KV that is not cached yet."""
        size = self.block_size
        for index, digest in enumerate(hashes):
            with self._lock:
                if digest in self.blocks:
                    self.blocks.get(digest)  # refresh its recency
                    continue
            cut = slice(index * size, (index + 1) * size)
            block = torch.stack([torch.stack((k[:, cut], v[:, cut])) for k, v in layers])
            with self._lock:
                self.blocks.put(digest, block)
