"""Transport interfaces the stages are written against."""

from __future__ import annotations

from typing import Protocol

import torch

from ..messages import KVHandoff


class EmbeddingTransport(Protocol):
    async def push(self, address: str, request_id: str, owner: str, embeddings: dict[str, torch.Tensor]) -> None:
        """Deliver item embeddings to the prefill worker at `address`."""

    async def fetch(self, owner: str, item_key: str) -> torch.Tensor | None:
        """The embedding held by `owner`, or None when it no longer has it (or is gone)."""


class KVTransport(Protocol):
    async def send(self, address: str, handoff: KVHandoff) -> None:
        """Stream a prefilled sequence's KV cache to the decode worker at `address`."""
