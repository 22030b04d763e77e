"""Prefill: merge text and image embeddings, compute the prompt's KV into the
paged pool (chunked under a token budget, several prompts packed in one
forward, each starting after the prefix it shares with earlier prompts), sample
the first token, and hand the KV to decode: a prompt's `KVSink` receives each
layer's blocks as soon as the last chunk's forward has written them, while the
next layer computes. The blocks stay held until `release` (decode has them).

Scheduling: prompts already under way continue first (one long prompt never
holds short ones back for more than a chunk), then waiting prompts are admitted
in arrival order while the pool has blocks for their whole prompt. A prompt
larger than the pool is refused when it arrives."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..cache import block_hashes
from ..messages import KVHandoff, PrefillJob
from ..models import LanguagePartBase, ModelAdapter
from .batch import PackedBatch
from .block_allocator import BlockAllocator
from .forward import PackedDecoder
from .kv_pool import KVPool
from .sampling import generator_state, new_generator, sample


class PromptTooLong(ValueError):
    """The prompt needs more KV blocks than the whole pool holds."""


class KVSink(Protocol):
    """Where a prompt's KV goes as it is computed (the transport's sender side)."""

    def write_layer(self, layer: int, block_table: list[int]) -> None:
        """Layer `layer` of the prompt's blocks is complete in the prefill pool (compute thread)."""


@dataclass
class PrefixHit:
    """Leading prompt blocks found in the pool; holding it keeps them from eviction."""

    blocks: list[int]
    block_size: int

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size


@dataclass(eq=False)  # an entity: queue membership tests compare identities, not every field (tensors)
class PrefillSequence:
    """One prompt being prefilled; its counters tell the whole story."""

    job: PrefillJob
    embeds: torch.Tensor  # [L, hidden] input embeddings, images scattered in
    positions: torch.Tensor  # [L] or [3, L]
    rope_delta: int
    names: list[str]  # chained block hashes of the prompt
    block_table: list[int] = field(default_factory=list)
    cached: int = 0  # leading tokens whose KV was shared from the prefix cache
    computed: int = 0  # leading tokens whose KV is in the blocks (cached included)

    @property
    def length(self) -> int:
        return len(self.job.input_ids)

    @property
    def remaining(self) -> int:
        return self.length - self.computed


@dataclass(frozen=True)
class PrefillResult:
    """A prompt that left the engine: its handoff, or why it failed."""

    request_id: str
    handoff: KVHandoff | None = None
    error: Exception | None = None


def images_within(input_ids: Sequence[int], image_token_id: int, image_rows: Sequence[int],
                  tokens: int) -> list[bool]:
    """For each image, whether all its placeholder rows lie in the first `tokens` prompt tokens
    (a prefix hit then makes its embedding unnecessary)."""
    slots = [position for position, token in enumerate(input_ids) if token == image_token_id]
    within, first = [], 0
    for rows in image_rows:
        within.append(rows == 0 or (first + rows <= len(slots) and slots[first + rows - 1] < tokens))
        first += rows
    return within


class PrefillEngine:
    """Synchronous prefill; `add` may be called from any thread, `step` from one compute thread."""

    def __init__(self, decoder: PackedDecoder, adapter: ModelAdapter, allocator: BlockAllocator,
                 token_budget: int = 8192) -> None:
        if token_budget <= 0:
            raise ValueError(f"prefill token budget must be > 0, got {token_budget}")
        self.decoder = decoder
        self.language: LanguagePartBase = decoder.language
        self.adapter = adapter
        self.pool: KVPool = decoder.pool
        self.allocator = allocator
        self.token_budget = token_budget
        self.incoming: deque[PrefillSequence] = deque()  # appended by other threads
        self.waiting: deque[PrefillSequence] = deque()
        self.running: list[PrefillSequence] = []
        self.handing_off: dict[str, list[int]] = {}  # request id -> blocks held until decode has the KV
        self._lock = threading.Lock()
        self.last_batch = 0  # sequences in the latest step

    @property
    def block_size(self) -> int:
        return self.pool.layout.block_size

    @property
    def has_work(self) -> bool:
        return bool(self.incoming or self.waiting or self.running)

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens admitted but not computed yet."""
        with self._lock:
            sequences = [*self.incoming, *self.waiting, *self.running]
        return sum(seq.remaining for seq in sequences)

    # ---- admission (event loop) ---------------------------------------------------
    def block_names(self, job: PrefillJob) -> list[str]:
        """The job's chained prompt block hashes, computed once."""
        if not self.allocator.naming:
            return []
        if job.prefix_blocks is None:
            rows = [self.adapter.image_tokens(size) for size in job.image_sizes]
            job.prefix_blocks = block_hashes(job.input_ids, self.adapter.image_token_id, job.image_keys, rows,
                                             self.block_size)
        return job.prefix_blocks

    def find_prefix(self, job: PrefillJob) -> PrefixHit | None:
        """The job's longest cached prefix, pinned, leaving at least one token to compute (its logits
        give the first token). Hand it to `add` through `job.prefix`, or to `release_prefix`."""
        usable = (len(job.input_ids) - 1) // self.block_size
        blocks = self.allocator.share_prefix(self.block_names(job), usable)
        return PrefixHit(blocks, self.block_size) if blocks else None

    def release_prefix(self, hit: PrefixHit | None) -> None:
        if hit is not None:
            self.allocator.free_blocks(hit.blocks)

    def needed_images(self, job: PrefillJob, prefix: PrefixHit | None) -> list[bool]:
        """Which images' embeddings the forward needs: those not wholly inside the cached prefix."""
        if prefix is None:
            return [True] * len(job.image_sizes)
        rows = [self.adapter.image_tokens(size) for size in job.image_sizes]
        return [not inside for inside in images_within(job.input_ids, self.adapter.image_token_id, rows, prefix.tokens)]

    def release(self, request_id: str, adopted: bool = False) -> None:
        """Decode has the KV (or the handoff failed): free the prompt's blocks, unless an in-process
        decode `adopted` them."""
        with self._lock:
            blocks = self.handing_off.pop(request_id, [])
        if not adopted:
            self.allocator.free_blocks(blocks)

    def add(self, job: PrefillJob) -> None:
        """Queue a job whose embeddings are ready; raises ValueError for one that can never run. The
        engine owns `job.prefix` once this returns (before, the caller releases it)."""
        needed = self.pool.layout.blocks_for(len(job.input_ids))
        if needed > self.allocator.num_blocks:
            raise PromptTooLong(f"request {job.request_id}: the prompt's {len(job.input_ids)} tokens need {needed} "
                                f"KV blocks; this prefill worker's pool holds {self.allocator.num_blocks}")
        embeds = self.prompt_embeddings(job)
        positions, delta = self.language.prompt_positions(job.input_ids, job.image_sizes)
        seq = PrefillSequence(job, embeds, positions, delta, self.block_names(job))
        if job.prefix is not None:
            self._start_after(seq, job.prefix)
        with self._lock:
            self.incoming.append(seq)

    def prompt_embeddings(self, job: PrefillJob) -> torch.Tensor:
        """[L, hidden] input embeddings with the image rows scattered at the placeholders (zeros
        for an image left out because the job's cached prefix covers it)."""
        ids = torch.tensor(job.input_ids, device=self.language.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.adapter.text_config.vocab_size):
            raise ValueError(f"request {job.request_id}: token ids must be in [0, "
                             f"{self.adapter.text_config.vocab_size})")
        embeds = self.language.embed(ids)
        slots = (ids == self.adapter.image_token_id).nonzero().view(-1)
        images = [e.to(embeds.device, embeds.dtype) if e is not None
                  else embeds.new_zeros((self.adapter.image_tokens(size), embeds.shape[-1]))
                  for e, size in zip(job.image_embeddings, job.image_sizes, strict=True)]
        rows = torch.cat(images) if images else embeds.new_zeros((0, embeds.shape[-1]))
        if rows.shape[0] != slots.numel():
            raise ValueError(f"request {job.request_id}: {slots.numel()} image placeholders but "
                             f"{rows.shape[0]} embedding rows")
        embeds[slots] = rows
        return embeds

    def cancel(self, request_id: str) -> bool:
        """Drop a prompt that has not finished (client gone); its blocks return to the pool."""
        with self._lock:
            for queue in (self.incoming, self.waiting):
                for seq in list(queue):
                    if seq.job.request_id == request_id:
                        queue.remove(seq)
                        self.allocator.free_blocks(seq.block_table)
                        return True
        return False  # running prompts finish their current step; the server drops the result

    def run(self, jobs: Sequence[PrefillJob]) -> list[KVHandoff]:
        """Prefill `jobs` to completion (offline use: profiling, benchmarks, tests); handoffs in finishing
        order. Each prompt's blocks stay held until `release`."""
        for job in jobs:
            self.add(job)
        handoffs = []
        while self.has_work:
            for result in self.step():
                if result.error is not None:
                    raise result.error
                assert result.handoff is not None  # a result is a handoff or an error
                handoffs.append(result.handoff)
        return handoffs

    # ---- one step (compute thread) ------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[PrefillResult]:
        """One packed forward under the token budget; results of the prompts it finished (or failed)."""
        scheduled = self.prepare()
        return self.run_prepared(scheduled) if scheduled else []

    def prepare(self, room: int | None = None) -> list[tuple[PrefillSequence, int]]:
        """Take in the prompts added since, and schedule the next forward's chunks: (prompt, tokens), at most
        `room` tokens (a mixed step's share) and the token budget."""
        with self._lock:
            self.waiting.extend(self.incoming)
            self.incoming.clear()
        scheduled = self._schedule(self.token_budget if room is None else min(room, self.token_budget))
        self.last_batch = len(scheduled)
        return scheduled

    @torch.no_grad()
    def run_prepared(self, scheduled: list[tuple[PrefillSequence, int]]) -> list[PrefillResult]:
        """The forward of the scheduled chunks and its results; an exception fails exactly this batch."""
        try:
            batch = PackedBatch(self.block_size)
            embeds, on_layer = self.pack(scheduled, batch)
            logits = self.decoder.forward(torch.cat(embeds), batch.finish(self.language.device), on_layer=on_layer)
            return self.finish_step(scheduled, logits)
        except Exception as exc:  # e.g. out of device memory
            return self.fail(scheduled, exc)

    def pack(self, scheduled: list[tuple[PrefillSequence, int]],
             batch: PackedBatch) -> tuple[list[torch.Tensor], Callable[[int], None] | None]:
        """Append the scheduled chunks to `batch`: their input embeddings, and what streams each layer's KV
        of the prompts this forward completes to their sinks (None if none has one)."""
        embeds = []
        for seq, take in scheduled:
            part = slice(seq.computed, seq.computed + take)
            batch.add(seq.block_table, seq.computed, take, seq.positions[..., part],
                      wants_logits=seq.computed + take == seq.length)
            embeds.append(seq.embeds[part])
        sinks = [(job_sink, seq.block_table) for seq, take in scheduled
                 if seq.computed + take == seq.length and (job_sink := seq.job.kv_sink) is not None]

        def stream_layer(layer: int) -> None:
            for sink, table in sinks:
                sink.write_layer(layer, table)

        return embeds, stream_layer if sinks else None

    def finish_step(self, scheduled: list[tuple[PrefillSequence, int]], logits: torch.Tensor) -> list[PrefillResult]:
        """Advance the scheduled prompts; those complete leave with their handoff (first token sampled
        from their row of `logits`, in scheduling order)."""
        results, row = [], 0
        for seq, take in scheduled:
            seq.computed += take
            self._name_full_blocks(seq)
            if seq.computed == seq.length:
                results.append(PrefillResult(seq.job.request_id, handoff=self._handoff(seq, logits[row])))
                row += 1
                with self._lock:
                    self.handing_off[seq.job.request_id] = seq.block_table
                self.running.remove(seq)
        return results

    def fail(self, scheduled: list[tuple[PrefillSequence, int]], error: Exception) -> list[PrefillResult]:
        """The scheduled prompts' forward failed: they leave, their blocks go back, each gets `error`."""
        for seq, _ in scheduled:
            self._retire(seq)
        return [PrefillResult(seq.job.request_id, error=error) for seq, _ in scheduled]

    def _schedule(self, budget: int) -> list[tuple[PrefillSequence, int]]:
        scheduled = []
        for seq in self.running:
            if budget == 0:
                break
            take = min(seq.remaining, budget)
            scheduled.append((seq, take))
            budget -= take
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.job.prefix is None:  # not looked up at admission: blocks named since may match
                seq.job.prefix = self.find_prefix(seq.job) or PrefixHit([], self.block_size)
                self._start_after(seq, seq.job.prefix)
            missing = self.pool.layout.blocks_for(seq.length) - len(seq.block_table)
            if missing > self.allocator.free:
                break  # wait for running prompts to hand off and free their blocks
            seq.block_table += self.allocator.allocate(missing)
            self.waiting.popleft()
            self.running.append(seq)
            take = min(seq.remaining, budget)
            scheduled.append((seq, take))
            budget -= take
        return scheduled

    @staticmethod
    def _start_after(seq: PrefillSequence, prefix: PrefixHit) -> None:
        seq.block_table = list(prefix.blocks)
        seq.cached = seq.computed = prefix.tokens

    def _name_full_blocks(self, seq: PrefillSequence) -> None:
        for index in range(seq.computed // self.block_size):
            if index < len(seq.names):
                self.allocator.name(seq.block_table[index], seq.names[index])

    def _handoff(self, seq: PrefillSequence, logits: torch.Tensor) -> KVHandoff:
        job = seq.job
        generator = new_generator(job.sampling)
        first = sample(logits, job.sampling, generator)
        return KVHandoff(request_id=job.request_id, prompt_tokens=seq.length, first_token=first,
                         next_position=seq.length, rope_delta=seq.rope_delta, sampling=job.sampling,
                         generator_state=generator_state(generator), cached_tokens=seq.cached,
                         block_table=list(seq.block_table))

    def _retire(self, seq: PrefillSequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.free_blocks(seq.block_table)
        seq.block_table = []
