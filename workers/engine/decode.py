"""Decode with continuous batching over the paged KV pool.

Every step runs one packed forward with one token per running sequence.
Sequences join and leave between steps by block tables alone: no KV is copied.
Admission is by the batch limit and free blocks (handoffs wait in arrival
order); when a running sequence needs a block and none is free, the newest
sequence is preempted: its blocks are copied to host memory and freed, and it
is swapped back in, ahead of new arrivals, once blocks are free again. A
sequence whose prompt plus `max_tokens` could never fit is refused at once."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..messages import FinishReason, KVHandoff, SamplingParams, TokenEvent
from ..models import ModelAdapter
from .batch import PackedBatch
from .block_allocator import BlockAllocator
from .detokenizer import IncrementalDetokenizer
from .forward import PackedDecoder
from .kv_pool import KVPool
from .sampling import restore_generator, sample


class SequenceTooLong(ValueError):
    """The sequence could never fit in the decode worker's KV capacity."""


@dataclass
class DecodeSequence:
    """One request being decoded; its counters tell the whole story."""

    request_id: str
    sampling: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    rope_delta: int
    length: int  # tokens whose KV is in the cache
    last_token: int  # sampled, its KV not computed yet
    arrival: int = 0  # admission order: the newest is preempted first, the oldest resumed first
    generated: int = 0  # tokens produced, the first (from prefill) included
    block_table: list[int] = field(default_factory=list)
    incoming: KVHandoff | None = None  # the prefill KV, until admitted
    swapped: torch.Tensor | None = None  # its blocks in host memory while preempted


@dataclass
class DecodeStats:
    """Structural counters the engine benchmark reports."""

    steps: int = 0
    tokens: int = 0
    peak_batch: int = 0
    peak_blocks: int = 0
    preemptions: int = 0
    swapped_bytes: int = 0  # KV copied out and back in by preemption (the only KV copies of decode)
    loaded_bytes: int = 0  # KV written into the pool by handoffs


class DecodeEngine:
    """Synchronous decode; the server calls `add`, `cancel` and `step` from one compute thread."""

    def __init__(self, decoder: PackedDecoder, adapter: ModelAdapter, allocator: BlockAllocator,
                 max_batch: int = 64, max_kv_tokens: int = 1 << 20) -> None:
        if max_batch <= 0 or max_kv_tokens <= 0:
            raise ValueError("decode max_batch and max_kv_tokens must be > 0")
        self.decoder = decoder
        self.language = decoder.language
        self.adapter = adapter
        self.pool: KVPool = decoder.pool
        self.allocator = allocator
        self.max_batch = max_batch
        self.max_blocks = min(allocator.num_blocks, max_kv_tokens // self.block_size)
        if self.max_blocks <= 0:
            raise ValueError(f"decode max_kv_tokens ({max_kv_tokens}) is below one KV block ({self.block_size})")
        self.running: list[DecodeSequence] = []  # in admission order; the last is preempted first
        self.waiting: deque[DecodeSequence] = deque()
        self.swapped: list[DecodeSequence] = []  # preempted, kept sorted by arrival
        self.arrivals = 0
        self.blocks_held = 0
        self.stats = DecodeStats()
        self._lock = threading.Lock()  # the metrics thread reads the counters below

    @property
    def block_size(self) -> int:
        return self.pool.layout.block_size

    # ---- capacity ----------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.swapped)

    @property
    def kv_tokens(self) -> int:
        return sum(seq.length for seq in list(self.running))

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.blocks_held / self.max_blocks)

    def _blocks_for(self, tokens: int) -> int:
        return self.pool.layout.blocks_for(tokens)

    def _can_take(self, blocks: int) -> bool:
        return blocks <= self.allocator.free and self.blocks_held + blocks <= self.max_blocks

    # ---- membership --------------------------------------------------------
    def validated(self, handoff: KVHandoff) -> KVHandoff:
        """A handoff from a peer must match this model's KV shape before it may touch the pool."""
        layout = self.pool.layout
        expected = (layout.num_kv_heads, handoff.next_position, layout.head_dim)
        vocab = int(self.adapter.text_config.vocab_size)
        if not 0 < handoff.next_position <= self.adapter.max_context:
            raise ValueError(f"request {handoff.request_id}: next position {handoff.next_position} is outside "
                             f"1..{self.adapter.max_context}")
        if not 0 <= handoff.first_token < vocab:
            raise ValueError(f"request {handoff.request_id}: first token {handoff.first_token} is not in [0, {vocab})")
        if len(handoff.layers) != layout.num_layers:
            raise ValueError(f"request {handoff.request_id}: KV of {len(handoff.layers)} layers, the model has "
                             f"{layout.num_layers}")
        for index, (keys, values) in enumerate(handoff.layers):
            for tensor in (keys, values):
                if tuple(tensor.shape) != expected or not tensor.is_floating_point():
                    raise ValueError(f"request {handoff.request_id}: layer {index} KV is {tensor.dtype} "
                                     f"{tuple(tensor.shape)}, expected a floating {expected}")
        return handoff

    def add(self, handoff: KVHandoff) -> TokenEvent:
        """Register a prefilled sequence; returns the event of its first token. The sequence joins
        the batch when the scheduler admits it."""
        worst = min(handoff.next_position + handoff.sampling.max_tokens, self.adapter.max_context)
        if self._blocks_for(worst) > self.max_blocks:
            raise SequenceTooLong(
                f"request {handoff.request_id}: {handoff.next_position} prompt tokens + max_tokens "
                f"{handoff.sampling.max_tokens} need {self._blocks_for(worst)} KV blocks; this decode worker "
                f"holds at most {self.max_blocks} ({self.max_blocks * self.block_size} tokens)")
        seq = DecodeSequence(request_id=handoff.request_id, sampling=handoff.sampling,
                             generator=restore_generator(handoff.generator_state),
                             detokenizer=IncrementalDetokenizer(self.adapter.tokenizer, handoff.sampling.stop),
                             rope_delta=handoff.rope_delta, length=handoff.next_position,
                             last_token=handoff.first_token, arrival=self.arrivals, incoming=handoff)
        self.arrivals += 1
        event = self._advance(seq, handoff.first_token)
        if event.finish_reason is None:
            self.waiting.append(seq)
        return event

    def cancel(self, request_id: str) -> bool:
        """Drop a sequence (client gone); its blocks return to the pool."""
        for group in (self.running, self.waiting, self.swapped):
            for seq in list(group):
                if seq.request_id == request_id:
                    group.remove(seq)
                    self._release(seq)
                    return True
        return False

    # ---- the step ----------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, make room for one token per sequence, run one forward; one event per
        running sequence."""
        self._admit()
        self._reserve_next_slots()
        if not self.running:
            return []
        batch = PackedBatch(self.block_size)
        for seq in self.running:
            batch.add(seq.block_table, seq.length, 1, self.language.text_positions(seq.length, 1, seq.rope_delta),
                      wants_logits=True)
        tokens = torch.tensor([seq.last_token for seq in self.running], device=self.language.device)
        logits = self.decoder.forward(self.language.embed(tokens), batch.finish(self.language.device))
        self.stats.steps += 1
        self.stats.tokens += len(self.running)
        self.stats.peak_batch = max(self.stats.peak_batch, len(self.running))
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.blocks_held)
        events = []
        for row, seq in enumerate(list(self.running)):
            seq.length += 1
            event = self._advance(seq, sample(logits[row], seq.sampling, seq.generator))
            events.append(event)
            if event.finish_reason is not None:
                self.running.remove(seq)
                self._release(seq)
        return events

    def fail_all(self) -> list[str]:
        """Drop every sequence (their step failed); returns their request ids."""
        ids = [seq.request_id for seq in (*self.running, *self.waiting, *self.swapped)]
        for request_id in ids:
            self.cancel(request_id)
        return ids

    def _admit(self) -> None:
        """Swapped-out sequences first (oldest first), then new handoffs in arrival order."""
        for queue in (self.swapped, self.waiting):
            while queue and len(self.running) < self.max_batch:
                seq = queue[0]
                blocks = self._blocks_for(seq.length + 1)
                if not self._can_take(blocks):
                    return
                queue.remove(seq)
                seq.block_table = self._allocate(blocks)
                if seq.swapped is not None:
                    self.pool.copy_in(seq.block_table[:seq.swapped.shape[2]], seq.swapped)
                    self.stats.swapped_bytes += seq.swapped.numel() * seq.swapped.element_size()
                    seq.swapped = None
                else:
                    self.pool.load(seq.block_table, seq.incoming.layers)
                    self.stats.loaded_bytes += seq.length * self.pool.layout.bytes_per_token
                    seq.incoming = None
                self.running.append(seq)

    def _reserve_next_slots(self) -> None:
        """Every running sequence gets a slot for its next token, preempting the newest if needed."""
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted to make room for an older one
            missing = self._blocks_for(seq.length + 1) - len(seq.block_table)
            while missing > 0 and not self._can_take(missing) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if missing > 0:
                if not self._can_take(missing):  # alone and still no room: wait for blocks
                    self._preempt(seq)
                    continue
                seq.block_table += self._allocate(missing)

    def _preempt(self, seq: DecodeSequence) -> None:
        self.running.remove(seq)
        seq.swapped = self.pool.copy_out(seq.block_table)
        self.stats.swapped_bytes += seq.swapped.numel() * seq.swapped.element_size()
        self.stats.preemptions += 1
        self._free(seq.block_table)
        seq.block_table = []
        self.swapped.append(seq)
        self.swapped.sort(key=lambda s: s.arrival)

    def _allocate(self, count: int) -> list[int]:
        blocks = self.allocator.allocate(count)
        self.blocks_held += count
        return blocks

    def _free(self, blocks: list[int]) -> None:
        self.allocator.free_blocks(blocks)
        self.blocks_held -= len(blocks)

    def _release(self, seq: DecodeSequence) -> None:
        self._free(seq.block_table)
        seq.block_table, seq.swapped, seq.incoming = [], None, None

    def _advance(self, seq: DecodeSequence, token: int) -> TokenEvent:
        seq.generated += 1
        seq.last_token = token
        finish: FinishReason | None = None
        if token in self.adapter.eos_token_ids and not seq.sampling.ignore_eos:
            text, finish = seq.detokenizer.flush(), "stop"
        else:
            text = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                finish = "stop"
            elif seq.generated >= seq.sampling.max_tokens or seq.length + 1 >= self.adapter.max_context:
                text += seq.detokenizer.flush()
                finish = "length"
        return TokenEvent(seq.request_id, token, text, finish)
