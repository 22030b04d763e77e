"""CUDA graphs of the decode step (GPU only), captured at start for a set of
batch-size buckets, as vLLM and nano-vllm do: a decode step of 7B-class models
is a few milliseconds of memory-bound kernels, and launching them one by one
from Python would cost as much again.

A step with B sequences replays the smallest bucket >= B with its inputs
copied into static buffers; the rows past B are padding whose keys and values
land in a scratch block held for the purpose, and whose logits are dropped."""

from __future__ import annotations

import logging

import torch

from .batch import PackedBatch, SequenceSlice
from .block_allocator import BlockAllocator
from .forward import PackedDecoder

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, decoder: PackedDecoder, allocator: BlockAllocator, max_batch: int, max_context: int,
                 buckets: tuple[int, ...] = BUCKETS) -> None:
        self.decoder = decoder
        self.language = decoder.language
        device = decoder.device
        block_size = decoder.pool.layout.block_size
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.max_blocks = -(-max_context // block_size)
        size = self.buckets[-1]
        self.scratch = allocator.allocate(1)[0]  # held for good: padding rows write their KV here
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        rank = self.language.position_rank
        self.positions = torch.zeros((rank, size) if rank > 1 else (size,), dtype=torch.long, device=device)
        self.slots = torch.full((size,), self.scratch * block_size, dtype=torch.long, device=device)
        self.tables = torch.zeros((size, self.max_blocks), dtype=torch.long, device=device)
        self.lens = torch.ones(size, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _batch(self, size: int) -> PackedBatch:
        batch = PackedBatch(self.decoder.pool.layout.block_size)
        batch.sequences = [SequenceSlice(row, 1, 1, []) for row in range(size)]  # shapes only: a decode batch
        batch.slots, batch.padded_tables, batch.context_lens = self.slots[:size], self.tables[:size], self.lens[:size]
        batch.position_ids = self.positions[..., :size]
        return batch

    def _forward(self, size: int) -> torch.Tensor:
        return self.decoder.forward(self.language.embed(self.tokens[:size]), self._batch(size))

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, largest first (later graphs reuse the first one's memory pool)."""
        for size in reversed(self.buckets):
            self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize(self.decoder.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def fits(self, size: int) -> bool:
        return size <= self.buckets[-1]

    @torch.no_grad()
    def run(self, tokens: list[int], positions: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Logits of a decode step (`batch` finished on the device) through the smallest fitting graph."""
        rows = len(tokens)
        size = next(b for b in self.buckets if b >= rows)
        self.tokens[:rows].copy_(torch.tensor(tokens), non_blocking=True)
        self.positions[..., :rows].copy_(positions, non_blocking=True)
        self.slots[:rows].copy_(batch.slot_tensor)
        self.slots[rows:size].fill_(self.scratch * self.decoder.pool.layout.block_size)
        tables, lengths = batch.decode_tables
        self.tables[:rows, :tables.shape[1]].copy_(tables)
        self.lens[:rows].copy_(lengths)
        self.lens[rows:size].fill_(1)
        self.graphs[size].replay()
        return self.outputs[size][:rows]
