"""One forward for both engines of a colocated worker.

Stepped apart, a colocated worker alternates a decode forward and a prefill
forward, and each pays a full pass over the weights and every per-layer launch;
under load the decode batch waits for each prefill and the other way round. As
vLLM's scheduler does, a step here packs the next token of every running
sequence and the scheduled prefill chunks into one forward: decode rows first
(the paged-decode kernel attends them in place), then the prefill chunks. Each
engine keeps its own scheduling (admission, preemption, its token budget), so
the tokens are those of separate steps. A step carries at most `step_tokens`
tokens, decode rows counted first (vLLM's `max_num_batched_tokens`): a long
prompt is chunked instead of holding every running sequence back for its whole
prefill, and under a burst the prompts finish prefill in groups, so the
sequences do not decode in lockstep with no prompt to share their steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..messages import TokenEvent
from .decode import DecodeEngine
from .prefill import PrefillEngine, PrefillResult

DEFAULT_STEP_TOKENS = 2048  # vLLM's CPU default for an API server


@dataclass
class MixedStepResult:
    """What one step produced; `failed` decode requests were dropped because the step raised `error`."""

    prefill: list[PrefillResult] = field(default_factory=list)
    decode: list[TokenEvent] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    error: Exception | None = None
    prefill_tokens: int = 0
    decode_tokens: int = 0


class MixedStepper:
    """Steps a prefill and a decode engine that share one decoder (and so one KV pool) together."""

    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine, step_tokens: int = DEFAULT_STEP_TOKENS) -> None:
        if prefill.decoder is not decode.decoder:
            raise ValueError("mixed steps need the prefill and decode engines to share one decoder and KV pool")
        if step_tokens <= decode.max_batch:
            raise ValueError(f"tokens per mixed step ({step_tokens}) must exceed the decode batch limit "
                             f"({decode.max_batch}), or a full decode batch would leave prefill no room")
        self.prefill = prefill
        self.decode = decode
        self.step_tokens = step_tokens

    @property
    def has_work(self) -> bool:
        return self.prefill.has_work or self.decode.active > 0

    @torch.no_grad()
    def step(self) -> MixedStepResult:
        rows = self.decode.prepare()
        scheduled = self.prefill.prepare(self.step_tokens - rows)
        result = MixedStepResult(prefill_tokens=sum(take for _, take in scheduled), decode_tokens=rows)
        if not scheduled:
            try:
                result.decode = self.decode.run_prepared() if rows else []
            except Exception as exc:  # a failed step fails its sequences, never the loop
                result.failed, result.error = self.decode.fail_all(), exc
            return result
        if not rows:
            result.prefill = self.prefill.run_prepared(scheduled)
            return result
        try:
            batch = self.decode.packed_batch()
            embeds, on_layer = self.prefill.pack(scheduled, batch)
            decoder = self.decode.decoder
            logits = decoder.forward(torch.cat([self.decode.input_embeddings(), *embeds]),
                                     batch.finish(decoder.device), on_layer=on_layer)
            result.decode = self.decode.finish_step(logits[:rows])
            result.prefill = self.prefill.finish_step(scheduled, logits[rows:])
        except Exception as exc:
            result.prefill = self.prefill.fail(scheduled, exc)
            result.decode, result.failed, result.error = [], self.decode.fail_all(), exc
        return result
