"""Attention over the paged KV pool, one backend chosen at start-up.

`SdpaAttention` (any device; the CPU path the tests pin) runs PyTorch's
scaled-dot-product attention per sequence: a sequence with nothing cached
attends over its own new tokens (causal), one that extends cached KV (a
prefix-cache hit, a later chunk, a decode step) over its blocks.
`CpuPagedAttention` runs decode steps and prompt chunks through C++ kernels
that read the blocks in place (`cpu_attention`); the CUDA decode kernel lives in
`triton_attention`. `select_backend` picks the fastest that runs here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from .batch import PackedBatch
from .cpu_attention import kernel as cpu_kernel
from .cpu_attention import paged_decode, paged_prefill
from .kv_pool import KVPool

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "cpu-paged", "triton")


class AttentionBackend(Protocol):
    name: str

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               batch: PackedBatch) -> torch.Tensor:
        """`[T, heads, dim]` outputs for `[T, heads, dim]` queries; the batch's new `[T, kv_heads, dim]`
        keys and values are already written to the pool."""


class SdpaAttention:
    name = "sdpa"

    def __init__(self, pool: KVPool, scale: float) -> None:
        self.pool = pool
        self.scale = scale

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               batch: PackedBatch) -> torch.Tensor:
        return self.attend_each(layer, query, keys, values, batch, torch.empty_like(query))

    def attend_each(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    batch: PackedBatch, out: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Fill `out`'s rows of sequences `first`.. one SDPA call each."""
        for index in range(first, len(batch.sequences)):
            self.attend_one(layer, query, keys, values, batch, out, index)
        return out

    def attend_one(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   batch: PackedBatch, out: torch.Tensor, index: int) -> None:
        """Fill `out`'s rows of sequence `index` with one SDPA call."""
        seq = batch.sequences[index]
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        q = query[rows].transpose(0, 1).unsqueeze(0)
        if seq.cached_len == 0:
            k, v = keys[rows], values[rows]
            mask = None
            causal = seq.query_len > 1
        else:
            k, v = self.pool.read(layer, batch.block_table(index), seq.context_len)
            mask = _offset_causal_mask(seq.query_len, seq.context_len, query.device) if seq.query_len > 1 else None
            causal = False
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                                           attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)


class PagedDecodeAttention(SdpaAttention):
    """The leading single-token rows (decode steps) through a paged-decode kernel, keys and values read in
    place from the pool; prefill sequences, whose queries are many and compute-bound, through SDPA."""

    # (query, keys, values, block tables, context lengths, scale) -> `[B, heads, dim]` outputs
    kernel: ClassVar[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                              torch.Tensor]]

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               batch: PackedBatch) -> torch.Tensor:
        rows = batch.decode_rows
        if rows == 0:
            return self.attend_prefill(layer, query, keys, values, batch, torch.empty_like(query), 0)
        key_cache, value_cache = self.pool.kv[layer]
        tables, lengths = batch.decode_tables
        decoded = type(self).kernel(query[:rows], key_cache, value_cache, tables, lengths, self.scale)
        if rows == len(batch.sequences):
            return decoded
        out = self.attend_prefill(layer, query, keys, values, batch, torch.empty_like(query), rows)
        out[:rows] = decoded
        return out

    def attend_prefill(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       batch: PackedBatch, out: torch.Tensor, first: int) -> torch.Tensor:
        """Fill `out`'s rows of the prompt chunks, sequences `first`.. (SDPA here)."""
        return self.attend_each(layer, query, keys, values, batch, out, first)


class CpuPagedAttention(PagedDecodeAttention):
    """Decode rows and prompt chunks through the C++ kernels (epd.workers.engine.cpu_attention), which read
    the blocks in place: the decode rows in one call, every prompt chunk of the forward in another."""

    name = "cpu-paged"
    kernel = paged_decode

    def attend_prefill(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       batch: PackedBatch, out: torch.Tensor, first: int) -> torch.Tensor:
        chunks = batch.prompt_chunks(first)
        key_cache, value_cache = self.pool.kv[layer]
        paged_prefill(out, query, key_cache, value_cache, chunks.tables, chunks.query_starts, chunks.query_lens,
                      chunks.context_lens, self.scale)
        return out


def _offset_causal_mask(queries: int, context: int, device: torch.device) -> torch.Tensor:
    """Query i (absolute position context - queries + i) sees keys up to its own position."""
    first = context - queries
    return torch.ones((queries, context), dtype=torch.bool, device=device).tril(first)


def select_backend(pool: KVPool, scale: float, preferred: str = "auto") -> AttentionBackend:
    """The fastest backend that runs here; logged so an operator sees which one serves."""
    backend: AttentionBackend = SdpaAttention(pool, scale)
    if pool.device.type == "cpu" and preferred in ("auto", "cpu-paged") and cpu_kernel() is not None:
        backend = CpuPagedAttention(pool, scale)
    if pool.device.type == "cuda" and preferred in ("auto", "triton"):
        try:
            from .triton_attention import TritonPagedAttention
        except ImportError as exc:
            log.warning("Triton is not importable (%s); decode attention falls back to SDPA", exc)
        else:
            backend = TritonPagedAttention(pool, scale)
    log.info("attention backend: %s on %s", backend.name, pool.device)
    return backend
