"""Prefix KV cache of the prefill worker: the KV of prompt blocks already
computed, found again by a chained hash of the block's content.

A block's identity covers its text token ids and, for image placeholders, the
image's content key and row offset, so two prompts share a block exactly when
everything up to and including it is the same text and the same images. A
multi-turn chat or a repeated image then skips the language-model prefill of
everything it has seen before, which an embedding cache alone cannot do
(the vision tower is a few percent of LLaVA's prefill compute)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import ByteLRU

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer ([heads, seq, dim] keys, values)


@dataclass
class PrefixHit:
    tokens: int
    layers: KVLayers  # [heads, tokens, dim] per layer


class PrefixKVCache:
    """Block KV tensors ([layers, 2, heads, block, dim]) in a byte-bounded LRU."""

    def __init__(self, capacity_bytes: int, block_size: int = 16) -> None:
        if block_size <= 0:
            raise ValueError(f"prefix cache block size must be > 0, got {block_size}")
        self.block_size = block_size
        self.blocks = ByteLRU(capacity_bytes)

    def lookup(self, hashes: Sequence[str], prompt_tokens: int) -> PrefixHit | None:
        """The longest cached run of leading blocks, leaving at least one prompt token to compute
        (its logits give the first token)."""
        usable = min(len(hashes), (prompt_tokens - 1) // self.block_size)
        found = []
        for digest in hashes[:usable]:
            block = self.blocks.get(digest)
            if block is None:
                break
            found.append(block)
        if not found:
            return None
        stacked = torch.cat(found, dim=3)
        return PrefixHit(len(found) * self.block_size, [(layer[0], layer[1]) for layer in stacked])

    def store(self, hashes: Sequence[str], layers: KVLayers) -> None:
        """Keep each full block of a prompt's KV that is not cached yet."""
        size = self.block_size
        for index, digest in enumerate(hashes):
            if digest in self.blocks:
                self.blocks.get(digest)  # refresh its recency
                continue
            cut = slice(index * size, (index + 1) * size)
            self.blocks.put(digest, torch.stack([torch.stack((k[:, cut], v[:, cut])) for k, v in layers]))
