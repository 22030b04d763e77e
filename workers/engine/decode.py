"""Decode with continuous batching over the paged KV pool.

Every step runs one packed forward with one token per running sequence.
Sequences join and leave between steps by block tables alone: no KV is copied.
A handoff is admitted before its KV arrives: `reserve` grants blocks (or, for a
prefill in the same process, room for the blocks it will hand over) while the
batch limit and the pool allow, and the KV is written straight into them; a
full pool makes the sender wait (back-pressure) instead of accepting KV it
cannot hold. When a running sequence needs a block and none is free, the
newest sequence is preempted: its blocks are copied to host memory and freed,
and it is swapped back in, ahead of new reservations, once blocks are free. A
sequence whose prompt plus `max_tokens` could never fit is refused at once."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..messages import FinishReason, KVHandoff, SamplingParams, TokenEvent
from ..models import ModelAdapter
from .batch import PackedBatch, SequenceSlice
from .block_allocator import BlockAllocator
from .cuda_graphs import BUCKETS, DecodeGraphs
from .detokenizer import IncrementalDetokenizer
from .forward import PackedDecoder
from .kv_pool import KVPool
from .sampling import restore_generator, sample


class SequenceTooLong(ValueError):
    """The sequence could never fit in the decode worker's KV capacity."""


@dataclass(eq=False)  # an entity: the batch's membership tests compare identities, not every field
class DecodeSequence:
    """One request being decoded; its counters tell the whole story."""

    request_id: str
    sampling: SamplingParams
    generator: torch.Generator | None  # None for greedy requests
    detokenizer: IncrementalDetokenizer
    rope_delta: int
    length: int  # tokens whose KV is in the cache
    last_token: int  # sampled, its KV not computed yet
    arrival: int = 0  # admission order: the newest is preempted first, the oldest resumed first
    generated: int = 0  # tokens produced, the first (from prefill) included
    block_table: list[int] = field(default_factory=list)
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
        self.reserved: dict[str, list[int]] = {}  # request id -> blocks granted, KV on its way
        self.adopting: dict[str, int] = {}  # request id -> blocks an in-process prefill will hand over
        self.waiting: deque[DecodeSequence] = deque()  # committed: KV in its blocks, joins at the next step
        self.swapped: list[DecodeSequence] = []  # preempted, kept sorted by arrival
        self.arrivals = 0
        self.blocks_held = 0
        self.stats = DecodeStats()
        self.graphs: DecodeGraphs | None = None

    @property
    def block_size(self) -> int:
        return self.pool.layout.block_size

    # ---- capacity ----------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.swapped)

    @property
    def holders(self) -> int:
        """Sequences holding (or about to hold) blocks: the batch limit counts them all."""
        return len(self.running) + len(self.waiting) + len(self.reserved) + len(self.adopting)

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

    def capture_cuda_graphs(self, buckets: tuple[int, ...] = BUCKETS) -> DecodeGraphs:
        """Replay decode steps from CUDA graphs (GPU only; captured once, for every batch size bucket)."""
        self.graphs = graphs = DecodeGraphs(self.decoder, self.allocator, self.max_batch, self.adapter.max_context,
                                            buckets)
        graphs.capture()
        return graphs

    # ---- membership --------------------------------------------------------
    def validated(self, handoff: KVHandoff, adopted_blocks: list[int] | None = None) -> KVHandoff:
        """A committed handoff from a peer must fit its reservation and the model before it joins."""
        vocab = int(self.adapter.text_config.vocab_size)
        if not 0 < handoff.next_position <= self.adapter.max_context:
            raise ValueError(f"request {handoff.request_id}: next position {handoff.next_position} is outside "
                             f"1..{self.adapter.max_context}")
        if not 0 <= handoff.first_token < vocab:
            raise ValueError(f"request {handoff.request_id}: first token {handoff.first_token} is not in [0, {vocab})")
        held = adopted_blocks if adopted_blocks is not None else self.reserved.get(handoff.request_id)
        if held is None:
            raise KeyError(f"request {handoff.request_id} has no KV reservation here (released or expired)")
        if len(held) != self._blocks_for(handoff.next_position):
            raise ValueError(f"request {handoff.request_id}: {handoff.next_position} tokens of KV need "
                             f"{self._blocks_for(handoff.next_position)} blocks, {len(held)} are held")
        return handoff

    def check_fits(self, request_id: str, prompt_tokens: int, max_tokens: int) -> int:
        """Blocks the prompt needs now; raises SequenceTooLong if prompt + max_tokens could never fit."""
        worst = min(prompt_tokens + max_tokens, self.adapter.max_context)
        if self._blocks_for(worst) > self.max_blocks:
            raise SequenceTooLong(
                f"request {request_id}: {prompt_tokens} prompt tokens + max_tokens {max_tokens} need "
                f"{self._blocks_for(worst)} KV blocks; this decode worker holds at most {self.max_blocks} "
                f"({self.max_blocks * self.block_size} tokens)")
        return self._blocks_for(prompt_tokens + 1)

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int, adopt: bool = False) -> list[int] | None:
        """Admit a handoff before its KV arrives: the blocks it will be written into (with `adopt`, room
        for the prompt blocks an in-process prefill hands over: an empty list), or None while the batch
        or the pool is full (the sender waits and asks again). Preempted sequences come back first."""
        blocks = self.check_fits(request_id, prompt_tokens, max_tokens)
        if self.swapped or self.holders >= self.max_batch:
            return None
        needed = self._blocks_for(prompt_tokens)
        if adopt:
            if self.blocks_held + needed + 1 > self.max_blocks:
                return None
            self.adopting[request_id] = needed
            self.blocks_held += needed
            return []
        if not self._can_take(blocks):
            return None
        self.reserved[request_id] = self._allocate(needed)
        return self.reserved[request_id]

    def release(self, request_id: str, adopted_blocks: list[int] | None = None) -> bool:
        """Give back a reservation whose KV will not come or will not be used (sender gone, client gone,
        deadline passed); blocks an in-process prefill already handed over are freed too."""
        if request_id in self.adopting:
            self.blocks_held -= self.adopting.pop(request_id)
            if adopted_blocks:
                self.allocator.free_blocks(adopted_blocks)
            return True
        blocks = self.reserved.pop(request_id, None)
        if blocks is None:
            return False
        self._free(blocks)
        return True

    def open(self, handoff: KVHandoff) -> tuple[DecodeSequence, TokenEvent]:
        """The sequence of a committed handoff and the event of its first token (sampled by prefill), made
        without touching the batch: the server sends that token at once, then `join`s the sequence."""
        seq = DecodeSequence(request_id=handoff.request_id, sampling=handoff.sampling,
                             generator=restore_generator(handoff.generator_state, handoff.sampling),
                             detokenizer=IncrementalDetokenizer(self.adapter.token_decoder, handoff.sampling.stop),
                             rope_delta=handoff.rope_delta, length=handoff.next_position,
                             last_token=handoff.first_token)
        return seq, self._advance(seq, handoff.first_token)

    def join(self, seq: DecodeSequence, adopted_blocks: list[int] | None = None) -> None:
        """The reserved blocks hold the sequence's prompt KV (or `adopted_blocks`, handed over in-process,
        do): it joins the batch at the next step."""
        request_id = seq.request_id
        if adopted_blocks is not None:
            if request_id not in self.adopting:
                raise KeyError(f"request {request_id} has no adoption reserved")
            self.blocks_held += len(adopted_blocks) - self.adopting.pop(request_id)
            seq.block_table = list(adopted_blocks)
        else:
            if request_id not in self.reserved:
                raise KeyError(f"request {request_id} has no KV blocks reserved")
            seq.block_table = self.reserved.pop(request_id)
        seq.arrival = self.arrivals
        self.arrivals += 1
        self.waiting.append(seq)

    def commit(self, handoff: KVHandoff, adopted_blocks: list[int] | None = None) -> TokenEvent:
        """`open` and, unless its first token ended it, `join` (the reservation is given back if it did)."""
        seq, event = self.open(handoff)
        if event.finish_reason is None:
            self.join(seq, adopted_blocks)
        else:
            self.release(handoff.request_id, adopted_blocks)
        return event

    def cancel(self, request_id: str) -> bool:
        """Drop a sequence or reservation (client gone); its blocks return to the pool."""
        if self.release(request_id):
            return True
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
        return self.run_prepared() if self.prepare() else []

    def prepare(self) -> int:
        """Admit what fits and give every running sequence a slot for its next token (preempting the newest
        if needed); how many sequences the next forward decodes."""
        self._admit()
        self._reserve_next_slots()
        return len(self.running)

    @torch.no_grad()
    def run_prepared(self) -> list[TokenEvent]:
        """The forward of a prepared step (through a CUDA graph when one fits), and its events."""
        batch = self.packed_batch().finish(self.language.device)
        if self.graphs is not None and self.graphs.fits(len(self.running)):
            logits = self.graphs.run([seq.last_token for seq in self.running], batch.packed_positions(), batch)
        else:
            logits = self.decoder.forward(self.input_embeddings(), batch)
        return self.finish_step(logits)

    def packed_batch(self) -> PackedBatch:
        """The running sequences' next tokens, one row each: a decode batch, or the head of a mixed one."""
        batch = PackedBatch(self.block_size)
        batch.sequences = [SequenceSlice(row, 1, seq.length + 1, seq.block_table) for row, seq in enumerate(self.running)]
        batch.logits_rows = list(range(len(self.running)))
        batch.positions = [self.language.text_positions_of([seq.length + seq.rope_delta for seq in self.running])]
        return batch

    def input_embeddings(self) -> torch.Tensor:
        """`[running, hidden]` embeddings of the running sequences' last tokens."""
        return self.language.embed(torch.tensor([seq.last_token for seq in self.running], device=self.language.device))

    def finish_step(self, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample every running sequence's next token from its row of `logits`; finished sequences leave."""
        greedy = logits.argmax(-1).tolist() if all(seq.sampling.greedy for seq in self.running) else None
        self.stats.steps += 1
        self.stats.tokens += len(self.running)
        self.stats.peak_batch = max(self.stats.peak_batch, len(self.running))
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.blocks_held)
        events = []
        for row, seq in enumerate(list(self.running)):
            seq.length += 1
            token = greedy[row] if greedy is not None else sample(logits[row], seq.sampling, seq.generator)
            event = self._advance(seq, token)
            events.append(event)
            if event.finish_reason is not None:
                self.running.remove(seq)
                self._release(seq)
        return events

    def fail_all(self) -> list[str]:
        """Drop every sequence (their step failed); returns their request ids. Reservations stay."""
        ids = [seq.request_id for seq in (*self.running, *self.waiting, *self.swapped)]
        for request_id in ids:
            self.cancel(request_id)
        return ids

    def _admit(self) -> None:
        """Committed sequences join (their blocks are theirs already); then swapped-out ones come back,
        oldest first, as blocks allow."""
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        while self.swapped and len(self.running) < self.max_batch:
            seq = self.swapped[0]
            blocks = self._blocks_for(seq.length + 1)
            if not self._can_take(blocks):
                return
            self.swapped.pop(0)
            seq.block_table = self._allocate(blocks)
            swapped, seq.swapped = seq.swapped, None
            assert swapped is not None  # it is in `self.swapped` because its KV is in host memory
            self.pool.copy_in(seq.block_table[:swapped.shape[2]], swapped)
            self.stats.swapped_bytes += swapped.numel() * swapped.element_size()
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
        seq.block_table, seq.swapped = [], None

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
