"""Drives the engines in-process the way the stage servers do: prefill steps
until every prompt has handed off, KV through the wire format, decode steps
with sequences joining at chosen steps. Shared by the engine tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from epd.workers.engine import DecodeEngine, EngineRuntime, KVCacheConfig, PrefillEngine, build_runtime
from epd.workers.engine.tensors import pack, unpack
from epd.workers.messages import ChatMessage, ImagePart, KVHandoff, PrefillJob, SamplingParams, TextPart
from epd.workers.models import EncodeInput

from .conftest import Stages
from .reference import image_size

MAX_NEW = 12


def make_job(stages: Stages, request_id: str, text: str, images: list[bytes], max_tokens: int = MAX_NEW,
             keys: list[str] | None = None) -> PrefillJob:
    """A prompt with its images encoded item by item, as if spread over several encode workers."""
    sizes = [image_size(data) for data in images]
    parts = tuple([ImagePart(i) for i in range(len(images))] + [TextPart(text)])
    ids = stages.adapter.build_prompt([ChatMessage("user", parts)], sizes)
    embeddings = []
    for data, size in zip(images, sizes):
        items = [EncodeInput(data, tile) for tile in range(len(stages.adapter.image_items(size)))]
        embeddings.append(stages.language.merge_image(size, [stages.vision.encode([item])[0] for item in items]))
    return PrefillJob(request_id, ids, embeddings, sizes, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      image_keys=keys or [])


def through_the_wire(handoff: KVHandoff) -> KVHandoff:
    handoff.layers = [(unpack(pack(k)), unpack(pack(v))) for k, v in handoff.layers]
    return handoff


@dataclass
class Engines:
    """A prefill and a decode engine, each over its own pool (as in separate workers)."""

    prefill: PrefillEngine
    decode: DecodeEngine
    prefill_runtime: EngineRuntime
    decode_runtime: EngineRuntime
    batch_sizes: list[int] = field(default_factory=list)  # decode batch of every step

    @classmethod
    def build(cls, stages: Stages, block_size: int = 4, token_budget: int = 8192, prefill_bytes: int = 1 << 24,
              decode_bytes: int = 1 << 24, max_batch: int = 16, max_kv_tokens: int = 1 << 20,
              attention: str = "auto") -> "Engines":
        prefill_runtime = build_runtime(stages.language, KVCacheConfig(prefill_bytes, block_size, attention=attention))
        decode_runtime = build_runtime(stages.language, KVCacheConfig(decode_bytes, block_size, prefix_cache_bytes=0,
                                                                      attention=attention))
        return cls(PrefillEngine(prefill_runtime.decoder, stages.adapter, prefill_runtime.allocator, token_budget),
                   DecodeEngine(decode_runtime.decoder, stages.adapter, decode_runtime.allocator, max_batch,
                                max_kv_tokens),
                   prefill_runtime, decode_runtime)

    def prefill_all(self, jobs: list[PrefillJob]) -> list[KVHandoff]:
        return [through_the_wire(handoff) for handoff in self.prefill.run(jobs)]

    def run(self, jobs: list[PrefillJob], join_every: int = 0) -> dict[str, list[int]]:
        """Prefill all jobs, then decode; with join_every > 0 one sequence joins every that many steps."""
        handoffs = self.prefill_all(jobs)
        tokens: dict[str, list[int]] = {job.request_id: [] for job in jobs}
        steps = 0
        while handoffs or self.decode.active:
            while handoffs and (join_every == 0 or steps % join_every == 0):
                handoff = handoffs.pop(0)
                tokens[handoff.request_id].append(self.decode.add(handoff).token_id)
                if join_every:
                    break
            for event in self.decode.step():
                tokens[event.request_id].append(event.token_id)
            self.batch_sizes.append(len(self.decode.running))
            steps += 1
        return tokens
