"""Which prefill worker each prompt block was last sent to: that worker's
prefix KV cache probably still holds it, so a follow-up turn or a repeated
image set is worth sending there unless it is much busier than the others."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixAffinity:
    """Bounded LRU of block hash -> prefill worker address."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[str, str] = OrderedDict()

    def cached_tokens(self, blocks: Sequence[str], block_size: int) -> dict[str, int]:
        """Prompt tokens each worker probably holds: the longest leading run of the blocks (of
        `block_size` tokens), found from the end (a worker sent block i was sent every block before
        it in the same request)."""
        for index in range(len(blocks) - 1, -1, -1):
            address = self._owner.get(blocks[index])
            if address is not None:
                return {address: (index + 1) * block_size}
        return {}

    def record(self, blocks: Sequence[str], address: str) -> None:
        for block in blocks:
            self._owner[block] = address
            self._owner.move_to_end(block)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
