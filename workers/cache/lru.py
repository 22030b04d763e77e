"""An LRU of tensors bounded by bytes."""

from __future__ import annotations

from collections import OrderedDict

import torch


class ByteLRU:
    """Least-recently-used tensors, evicted once their bytes exceed `capacity`."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self.bytes = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self._items.get(key)
        if tensor is not None:
            self._items.move_to_end(key)
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> list[str]:
        """Insert (or refresh) a tensor; returns the keys evicted to make room."""
        self.pop(key)
        size = tensor.numel() * tensor.element_size()
        self._items[key] = tensor
        self.bytes += size
        evicted = []
        while self.bytes > self.capacity and len(self._items) > 1:
            old, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
            evicted.append(old)
        if self.bytes > self.capacity:  # a single tensor larger than the whole cache is not kept
            self.pop(key)
            evicted.append(key)
        return evicted

    def pop(self, key: str) -> torch.Tensor | None:
        tensor = self._items.pop(key, None)
        if tensor is not None:
            self.bytes -= tensor.numel() * tensor.element_size()
        return tensor
