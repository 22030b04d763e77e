"""Who owns which block of the KV pool, and which full blocks are cached.

Blocks are reference-counted. A full prompt block may be named by the chained
hash of its content (text ids and image content keys, see `cache.keys`); a
named block is the prefix cache itself: any later prompt that starts with the
same blocks shares them (reference count + 1, no copy). When its last user
frees it, a named block stays named on an LRU list of free blocks and is only
evicted (unnamed, reused) when the pool needs room. `cached_bytes_limit`
bounds how much of the pool may idle as prefix cache (0 turns naming off).

The prefill server looks prefixes up on its event loop while the engine
allocates on its compute thread, so every public method takes the lock."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockAllocator:
    def __init__(self, num_blocks: int, max_cached_blocks: int | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the allocator needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.max_cached_blocks = num_blocks if max_cached_blocks is None else max_cached_blocks
        self.refs = [0] * num_blocks
        self.name_of: list[str | None] = [None] * num_blocks
        self.by_name: dict[str, int] = {}
        self.empty: list[int] = list(range(num_blocks - 1, -1, -1))  # unnamed free blocks (a stack)
        self.cached: OrderedDict[int, None] = OrderedDict()  # named free blocks, least recently used first
        self._lock = threading.Lock()

    # ---- accounting ---------------------------------------------------------------
    @property
    def free(self) -> int:
        """Blocks an allocation may take (named free blocks are evicted on demand)."""
        return len(self.empty) + len(self.cached)

    @property
    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.free

    @property
    def naming(self) -> bool:
        return self.max_cached_blocks > 0

    # ---- allocation ---------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """`count` blocks with a reference each, evicting cached prefix blocks if needed."""
        with self._lock:
            if count > self.free:
                raise OutOfBlocks(f"asked for {count} KV blocks, {self.free} free of {self.num_blocks}")
            blocks = []
            for _ in range(count):
                if self.empty:
                    block = self.empty.pop()
                else:
                    block, _ = self.cached.popitem(last=False)
                    self._unname(block)
                self.refs[block] = 1
                blocks.append(block)
            return blocks

    def free_blocks(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; unreferenced named blocks stay cached. Blocks go back in
        reverse: the next allocation pops them in their old order (runs of consecutive ids stay runs, one
        copy each in a handoff), and a sequence's tail blocks are the first cached ones to be evicted."""
        with self._lock:
            for block in reversed(blocks):
                self.refs[block] -= 1
                if self.refs[block] < 0:
                    raise AssertionError(f"KV block {block} freed more often than allocated")
                if self.refs[block] == 0:
                    if self.name_of[block] is None:
                        self.empty.append(block)
                    else:
                        self.cached[block] = None
            while len(self.cached) > self.max_cached_blocks:
                block, _ = self.cached.popitem(last=False)
                self._unname(block)
                self.empty.append(block)

    # ---- the prefix cache ---------------------------------------------------------
    def share_prefix(self, names: Sequence[str], limit: int) -> list[int]:
        """The blocks holding the longest cached run of leading `names` (at most `limit`), each with
        one more reference: they cannot be evicted while the caller holds them."""
        with self._lock:
            found = []
            for name in names[:limit]:
                block = self.by_name.get(name)
                if block is None:
                    break
                if self.refs[block] == 0:
                    del self.cached[block]
                self.refs[block] += 1
                found.append(block)
            return found

    def name(self, block: int, name: str) -> None:
        """Name a full, computed block so later prompts can share it (first writer wins)."""
        with self._lock:
            if not self.naming or name in self.by_name or self.name_of[block] is not None:
                return
            self.name_of[block] = name
            self.by_name[name] = block

    def cached_names(self) -> int:
        with self._lock:
            return len(self.by_name)

    def _unname(self, block: int) -> None:
        name = self.name_of[block]
        if name is not None:
            del self.by_name[name]
            self.name_of[block] = None
