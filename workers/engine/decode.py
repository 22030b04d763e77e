"""Decode with continuous batching: sequences join and leave between steps.

All active sequences share one left-padded batched KV cache. Appending a
token is in place; the cache is only re-laid out when membership changes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..messages import FinishReason, KVHandoff, SamplingParams, TokenEvent
from ..models import LanguagePartBase, ModelAdapter
from .detokenizer import IncrementalDetokenizer
from .sampling import restore_generator, sample
from .tensors import left_pad


@dataclass
class Sequence:
    """One request being decoded; its counters tell the whole story."""

    request_id: str
    sampling: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    kv_len: int  # tokens in the KV cache
    rope_delta: int
    last_token: int
    generated: int = 0  # tokens produced, the first (from prefill) included
    pending_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # until it joins the batch


class DecodeEngine:
    """Synchronous decode loop body; the server calls `step()` from one thread."""

    def __init__(self, language: LanguagePartBase, adapter: ModelAdapter, max_batch: int = 64,
                 max_kv_tokens: int = 1 << 20) -> None:
        self.language = language
        self.adapter = adapter
        self.max_batch = max_batch
        self.max_kv_tokens = max_kv_tokens
        self.batch: list[Sequence] = []  # rows of the batched cache, in order
        self.joining: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    # ---- capacity ----------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.batch) + len(self.joining)

    @property
    def kv_tokens(self) -> int:
        return sum(seq.kv_len for seq in (*self.batch, *self.joining))

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.kv_tokens / self.max_kv_tokens)

    def has_capacity(self, tokens: int) -> bool:
        return self.active < self.max_batch and self.kv_tokens + tokens <= self.max_kv_tokens

    # ---- membership --------------------------------------------------------
    def add(self, handoff: KVHandoff) -> TokenEvent:
        """Register a prefilled sequence; returns the event of its first token."""
        seq = Sequence(request_id=handoff.request_id, sampling=handoff.sampling,
                       generator=restore_generator(handoff.generator_state),
                       detokenizer=IncrementalDetokenizer(self.adapter.tokenizer, handoff.sampling.stop),
                       kv_len=handoff.next_position, rope_delta=handoff.rope_delta,
                       last_token=handoff.first_token, pending_kv=handoff.layers)
        event = self._advance(seq, handoff.first_token)
        if event.finish_reason is None:
            self.joining.append(seq)
        return event

    def cancel(self, request_id: str) -> bool:
        """Drop a sequence (client gone); returns whether it was active."""
        for group in (self.joining, self.batch):
            for index, seq in enumerate(group):
                if seq.request_id == request_id:
                    if group is self.batch:
                        self._drop_rows([index])
                    else:
                        del group[index]
                    return True
        return False

    # ---- the step ----------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One forward for every active sequence; one event per sequence."""
        if self.joining:
            self._relayout()
        if not self.batch:
            return []
        device = self.language.device
        tokens = torch.tensor([[seq.last_token] for seq in self.batch], device=device)
        positions = torch.tensor([seq.kv_len + seq.rope_delta for seq in self.batch], device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.batch), 1))], dim=1)
        logits = self.language.forward(self.language.embed(tokens), self.mask,
                                       self.language.step_positions(positions), self.cache)
        events, finished = [], []
        for row, seq in enumerate(self.batch):
            seq.kv_len += 1
            token = sample(logits[row], seq.sampling, seq.generator)
            event = self._advance(seq, token)
            events.append(event)
            if event.finish_reason is not None:
                finished.append(row)
        if finished:
            self._drop_rows(finished)
        return events

    def _advance(self, seq: Sequence, token: int) -> TokenEvent:
        seq.generated += 1
        seq.last_token = token
        finish: FinishReason | None = None
        if token in self.adapter.eos_token_ids and not seq.sampling.ignore_eos:
            text, finish = seq.detokenizer.flush(), "stop"
        else:
            text = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                finish = "stop"
            elif seq.generated >= seq.sampling.max_tokens or seq.kv_len + 1 >= self.adapter.max_context:
                text += seq.detokenizer.flush()
                finish = "length"
        return TokenEvent(seq.request_id, token, text, finish)

    # ---- batched cache layout ----------------------------------------------
    def _rows(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each batched sequence's own (unpadded) KV per layer."""
        rows = []
        for row, seq in enumerate(self.batch):
            rows.append([(layer.keys[row, :, -seq.kv_len:], layer.values[row, :, -seq.kv_len:])
                         for layer in self.cache.layers])
        return rows

    def _relayout(self) -> None:
        kv = self._rows() if self.batch else []
        for seq in self.joining:
            kv.append([(k.to(self.language.device, self.language.dtype), v.to(self.language.device, self.language.dtype))
                       for k, v in seq.pending_kv])
            seq.pending_kv = None
        self.batch.extend(self.joining)
        self.joining = []
        self._build(kv)

    def _drop_rows(self, rows: list[int]) -> None:
        keep = [i for i in range(len(self.batch)) if i not in set(rows)]
        kv = self._rows()
        self.batch = [self.batch[i] for i in keep]
        self._build([kv[i] for i in keep])

    def _build(self, kv: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        if not self.batch:
            self.cache, self.mask = None, None
            return
        width = max(seq.kv_len for seq in self.batch)
        self.cache = DynamicCache(config=self.adapter.text_config)
        for layer in range(len(kv[0])):
            keys = [left_pad(k, width) for k, _ in (row[layer] for row in kv)]
            values = [left_pad(v, width) for _, v in (row[layer] for row in kv)]
            self.cache.update(torch.stack(keys), torch.stack(values), layer)
        self.mask = torch.zeros((len(self.batch), width), dtype=torch.long, device=self.language.device)
        for row, seq in enumerate(self.batch):
            self.mask[row, width - seq.kv_len:] = 1

