"""Both engines over one shared pool, driven without servers: what profiling
and the engine benchmark time. Decode adopts the prefill blocks (as a
colocated worker does), so a prompt's KV is never copied."""

from __future__ import annotations

from collections.abc import Sequence

from ..messages import KVHandoff, PrefillJob, TokenEvent
from ..models import LanguagePartBase, ModelAdapter
from .decode import DecodeEngine
from .prefill import PrefillEngine
from .runtime import EngineRuntime, KVCacheConfig, build_runtime


class OfflineEngines:
    def __init__(self, language: LanguagePartBase, adapter: ModelAdapter, config: KVCacheConfig | None = None,
                 token_budget: int = 8192, max_batch: int = 256, max_kv_tokens: int = 1 << 30,
                 enforce_eager: bool = False, compile_float32: bool = False) -> None:
        self.runtime: EngineRuntime = build_runtime(language, config or KVCacheConfig(), enforce_eager=enforce_eager,
                                                    compile_float32=compile_float32)
        self.prefill = PrefillEngine(self.runtime.decoder, adapter, self.runtime.allocator, token_budget)
        self.decode = DecodeEngine(self.runtime.decoder, adapter, self.runtime.allocator, max_batch, max_kv_tokens)

    def prefill_only(self, jobs: Sequence[PrefillJob]) -> list[KVHandoff]:
        """Prefill and free the prompts' blocks again (timing prefill alone)."""
        handoffs = self.prefill.run(jobs)
        for handoff in handoffs:
            self.prefill.release(handoff.request_id)
        return handoffs

    def start_decoding(self, jobs: Sequence[PrefillJob]) -> list[TokenEvent]:
        """Prefill the prompts and hand them to decode (they join at its next step); first-token events."""
        for job in jobs:
            if self.decode.reserve(job.request_id, len(job.input_ids), job.sampling.max_tokens, adopt=True) is None:
                raise RuntimeError(f"decode has no room for {job.request_id}: raise max_batch or the pool size")
        events = []
        for handoff in self.prefill.run(jobs):
            self.prefill.release(handoff.request_id, adopted=True)
            events.append(self.decode.commit(handoff, handoff.block_table))
        return events
