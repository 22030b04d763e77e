"""What one forward of the packed decoder computes: all new tokens of all its
sequences in one tensor, with per-sequence offsets into it and into the KV pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_pool import slot_mapping


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's share of a packed batch: `query_len` new tokens at `query_start`, which
    extend its KV to `context_len` tokens (those before them are already in its blocks)."""

    query_start: int
    query_len: int
    context_len: int
    block_table: list[int]

    @property
    def cached_len(self) -> int:
        return self.context_len - self.query_len


@dataclass(frozen=True)
class KernelPrompts:
    """Some prompt chunks of a batch as a prefill kernel takes them: `[S, max_blocks]` block tables and `[S]`
    first packed rows, row counts and context lengths."""

    tables: torch.Tensor
    query_starts: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor


@dataclass
class PackedBatch:
    """A forward's inputs besides the embeddings; built with `add`, then `finish`."""

    block_size: int
    sequences: list[SequenceSlice] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)  # per sequence, [n] or [3, n]
    logits_rows: list[int] = field(default_factory=list)  # packed rows whose next-token logits are needed
    slots: torch.Tensor | None = None  # pool slot of every packed token
    # the leading single-token rows (decode steps), for paged kernels: [rows, max_blocks] tables, [rows] lengths
    padded_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    logits_index: torch.Tensor | None = None  # rows whose logits are needed; None: every row (decode)
    position_ids: torch.Tensor | None = None  # given directly (decode, CUDA graphs), else from `positions`
    device: torch.device | None = None  # where `finish` put the tensors
    # kernel inputs derived once per forward for every layer: first sequence -> the prompt chunks from it on
    _prompt_chunks: dict[int, KernelPrompts] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(s.query_len for s in self.sequences)

    def add(self, block_table: list[int], cached: int, new: int, positions: torch.Tensor, wants_logits: bool) -> None:
        start = self.num_tokens
        self.sequences.append(SequenceSlice(start, new, cached + new, block_table))
        self.positions.append(positions)
        if wants_logits:
            self.logits_rows.append(start + new - 1)

    def finish(self, device: torch.device) -> "PackedBatch":
        """Compute the slot mapping, and the padded tables of the leading single-token rows, on `device`."""
        self.device = device
        size, rows = self.block_size, self.decode_rows
        singles = self.sequences[:rows]
        parts = [slot_mapping(s.block_table, s.cached_len, s.context_len, size) for s in self.sequences[rows:]]
        if rows:  # plain integers, one tensor each (the per-step hot path)
            parts.insert(0, torch.tensor([s.block_table[s.cached_len // size] * size + s.cached_len % size
                                          for s in singles], dtype=torch.long))
            self.padded_tables = _padded_tables(singles, device)
            self.context_lens = _longs([s.context_len for s in singles], device)
        self.slots = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device)
        if len(self.logits_rows) != self.num_tokens:
            self.logits_index = torch.tensor(self.logits_rows, dtype=torch.long).to(device)
        return self

    @property
    def slot_tensor(self) -> torch.Tensor:
        """The pool slot of every packed token (after `finish`)."""
        if self.slots is None:
            raise RuntimeError("the batch is not finished: no slot mapping yet")
        return self.slots

    @property
    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`[decode_rows, max_blocks]` padded block tables and `[decode_rows]` context lengths of the leading
        single-token rows of a finished batch, for paged decode kernels."""
        if self.padded_tables is None or self.context_lens is None:
            raise RuntimeError("no finished single-token rows: no padded block tables")
        return self.padded_tables, self.context_lens

    def block_table(self, index: int) -> torch.Tensor:
        """Sequence `index`'s block table as a tensor on the batch's device."""
        return torch.tensor(self.sequences[index].block_table, dtype=torch.long).to(self.device)

    def prompt_chunks(self, first: int) -> KernelPrompts:
        """Sequences `first`.. (prompt chunks) as a prefill kernel takes them; built on the first call of a
        forward, reused by every layer."""
        if first not in self._prompt_chunks:
            chosen = self.sequences[first:]
            self._prompt_chunks[first] = KernelPrompts(_padded_tables(chosen, self.device),
                                                       _longs([s.query_start for s in chosen], self.device),
                                                       _longs([s.query_len for s in chosen], self.device),
                                                       _longs([s.context_len for s in chosen], self.device))
        return self._prompt_chunks[first]

    @property
    def decode_rows(self) -> int:
        """How many leading sequences add one token each: decode steps (a colocated worker's mixed batch puts
        them first), which paged decode kernels attend in place."""
        return next((i for i, s in enumerate(self.sequences) if s.query_len != 1), len(self.sequences))

    def packed_positions(self) -> torch.Tensor:
        """`[T]` (1-D RoPE) or `[3, T]` (M-RoPE) position ids of every packed token."""
        return self.position_ids if self.position_ids is not None else torch.cat(self.positions, dim=-1)


def _longs(values: list[int] | list[list[int]], device: torch.device | None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)


def _padded_tables(sequences: list[SequenceSlice], device: torch.device | None) -> torch.Tensor:
    """`[len(sequences), max_blocks]` block tables, each padded with block 0 (never read past its length)."""
    width = max(len(s.block_table) for s in sequences)
    return _longs([s.block_table + [0] * (width - len(s.block_table)) for s in sequences], device)
