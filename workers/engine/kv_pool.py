"""The paged KV pool: one allocation per worker, fixed-size blocks.

Keys and values of every layer live in one tensor
`[layers, 2, blocks, block_size, kv_heads, head_dim]`, allocated once at start-up
and never resized. A sequence owns a list of block ids (its block table); a
token's KV sits at slot `block * block_size + offset`. Sequences joining or
leaving a batch only change block tables: no KV moves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # e.g. shared memory (transport.shm)


@dataclass(frozen=True)
class KVLayout:
    """The shape of one model's KV cache blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size) <= 0:
            raise ValueError(f"every KV layout dimension must be > 0, got {self}")

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


class KVPool:
    """The KV tensors; who owns which block is the `BlockAllocator`'s business."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu",
                 allocate: Allocator | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        # torch.empty (and fresh shared memory): pages are only touched when a block is first written,
        # so an idle worker's resident memory grows with use, not with the configured pool size.
        self.kv = (allocate(shape, layout.dtype) if allocate is not None
                   else torch.empty(shape, dtype=layout.dtype, device=device))

    @classmethod
    def sized(cls, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cpu",
              allocate: Allocator | None = None) -> "KVPool":
        """The largest pool of whole blocks that fits in `capacity_bytes`."""
        blocks = capacity_bytes // layout.bytes_per_block
        if blocks <= 0:
            raise ValueError(f"a KV pool of {capacity_bytes} bytes holds no block of {layout.bytes_per_block} bytes "
                             f"({layout.block_size} tokens)")
        return cls(layout, blocks, device, allocate)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer as `[blocks * block_size, kv_heads, head_dim]` views."""
        keys, values = self.kv[layer]
        return keys.flatten(0, 1), values.flatten(0, 1)

    def write(self, layer: int, slot_mapping: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `[tokens, kv_heads, head_dim]` keys and values at their slots."""
        key_slots, value_slots = self.slots(layer)
        key_slots.index_copy_(0, slot_mapping, keys.to(self.layout.dtype))
        value_slots.index_copy_(0, slot_mapping, values.to(self.layout.dtype))

    def read(self, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens' keys and values of one sequence, `[length, kv_heads, head_dim]`."""
        keys, values = self.kv[layer]
        return (keys.index_select(0, block_table).flatten(0, 1)[:length],
                values.index_select(0, block_table).flatten(0, 1)[:length])

    def copy_out(self, blocks: list[int]) -> torch.Tensor:
        """The blocks' KV `[layers, 2, n, block_size, kv_heads, head_dim]`, copied to host memory."""
        return self.kv.index_select(2, torch.tensor(blocks, device=self.device)).to("cpu")

    def copy_in(self, blocks: list[int], data: torch.Tensor) -> None:
        """Inverse of `copy_out` into (possibly other) blocks."""
        self.kv.index_copy_(2, torch.tensor(blocks, device=self.device), data.to(self.device))


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Pool slots of token positions `start..end-1` of a sequence."""
    positions = torch.arange(start, end)
    blocks = torch.tensor(block_table, dtype=torch.long)[positions // block_size]
    return (blocks * block_size + positions % block_size).to(device)
