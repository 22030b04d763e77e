"""Drives the engines in-process the way the stage servers do: decode reserves
blocks first, prefill steps write each layer's KV into them as it computes
(the transport's own block copy: what the shared-memory and CUDA IPC paths
run), decode commits and steps with sequences joining at chosen steps. With
`shared=True` both engines use one pool and decode adopts the prefill blocks
(the in-process path). Shared by the engine tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from epd.workers.engine import DecodeEngine, EngineRuntime, KVCacheConfig, PrefillEngine, build_runtime
from epd.workers.engine.step_threads import StepThreads
from epd.workers.messages import ChatMessage, ImagePart, KVHandoff, PrefillJob, SamplingParams, TextPart
from epd.workers.models import EncodeInput
from epd.workers.transport.block_copy import BlockCopyPlan, copy_layer

from .conftest import Stages, png_bytes
from .reference import image_size, reference_generate

MAX_NEW = 12
TEXTS = ["What is shown?", "How many objects are there in this photo today?", "Hello", "Red, green, blue.",
         "Describe the weather.", "The cat sat on the mat.", "One, two, three", "Explain step by step."]


def make_job(stages: Stages, request_id: str, text: str, images: list[bytes], max_tokens: int = MAX_NEW,
             keys: list[str] | None = None) -> PrefillJob:
    """A prompt with its images encoded item by item, as if spread over several encode workers."""
    sizes = [image_size(data) for data in images]
    parts = tuple([ImagePart(i) for i in range(len(images))] + [TextPart(text)])
    ids = stages.adapter.build_prompt([ChatMessage("user", parts)], sizes)
    embeddings = []
    for data, size in zip(images, sizes, strict=True):
        items = [EncodeInput(data, tile) for tile in range(len(stages.adapter.image_items(size)))]
        embeddings.append(stages.language.merge_image(size, [stages.vision.encode([item])[0] for item in items]))
    return PrefillJob(request_id, ids, embeddings, sizes, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      image_keys=keys or [])


def mixed_jobs(stages: Stages, count: int = len(TEXTS)):
    jobs, expected = [], {}
    for i, text in enumerate(TEXTS[:count]):
        images = [png_bytes(36 + 5 * i + 9 * k, 28 + 3 * k, seed=100 + 10 * i + k) for k in range(i % 3)]
        job = make_job(stages, f"mix{i}", text, images)
        jobs.append(job)
        expected[job.request_id] = reference_generate(stages.adapter, stages.full, job.input_ids, images, MAX_NEW)
    return jobs, expected


@dataclass
class CopySink:
    """Writes each finished layer of a prompt into the decode pool's reserved blocks."""

    source: EngineRuntime
    target: EngineRuntime
    blocks: list[int]
    layers: list[int] = field(default_factory=list)

    def write_layer(self, layer: int, block_table: list[int]) -> None:
        plan = BlockCopyPlan.between(block_table, self.blocks, self.source.pool.device)
        copy_layer(self.source.pool.kv, self.target.pool.kv, layer, plan)
        self.layers.append(layer)


@dataclass
class Engines:
    """A prefill and a decode engine: over two pools (separate workers) or one (`shared`: in-process)."""

    prefill: PrefillEngine
    decode: DecodeEngine
    prefill_runtime: EngineRuntime
    decode_runtime: EngineRuntime
    shared: bool = False
    batch_sizes: list[int] = field(default_factory=list)  # decode batch of every step

    @classmethod
    def build(cls, stages: Stages, block_size: int = 4, token_budget: int = 8192, prefill_bytes: int = 1 << 24,
              decode_bytes: int = 1 << 24, max_batch: int = 16, max_kv_tokens: int = 1 << 20,
              attention: str = "auto", shared: bool = False, threads: StepThreads | None = None) -> "Engines":
        prefill_runtime = build_runtime(stages.language, KVCacheConfig(prefill_bytes, block_size, attention=attention),
                                        threads=threads)
        decode_runtime = prefill_runtime if shared else build_runtime(
            stages.language, KVCacheConfig(decode_bytes, block_size, prefix_cache_bytes=0, attention=attention),
            threads=threads)
        return cls(PrefillEngine(prefill_runtime.decoder, stages.adapter, prefill_runtime.allocator, token_budget),
                   DecodeEngine(decode_runtime.decoder, stages.adapter, decode_runtime.allocator, max_batch,
                                max_kv_tokens),
                   prefill_runtime, decode_runtime, shared)

    def prefill_all(self, jobs: list[PrefillJob]) -> list[KVHandoff]:
        """Reserve at decode (every job must fit now), prefill with layer-wise writes, release the
        prefill side: the handoffs, ready for `commit`."""
        return self._prefill([(job, self._reserve(job)) for job in jobs])

    def _reserve(self, job: PrefillJob) -> list[int] | None:
        blocks = self.decode.reserve(job.request_id, len(job.input_ids), job.sampling.max_tokens, self.shared)
        return blocks

    def _prefill(self, admitted: list[tuple[PrefillJob, list[int] | None]]) -> list[KVHandoff]:
        sinks = {}
        for job, blocks in admitted:
            assert blocks is not None, f"decode has no room for {job.request_id}"
            if not self.shared:
                job.kv_sink = sinks[job.request_id] = CopySink(self.prefill_runtime, self.decode_runtime, blocks)
        handoffs = self.prefill.run([job for job, _ in admitted])
        for handoff in handoffs:
            if not self.shared:
                assert sinks[handoff.request_id].layers == list(range(self.prefill_runtime.pool.layout.num_layers))
            self.prefill.release(handoff.request_id, adopted=self.shared)
        return handoffs

    def commit(self, handoff: KVHandoff) -> int:
        return self.decode.commit(handoff, handoff.block_table if self.shared else None).token_id

    def run(self, jobs: list[PrefillJob], join_every: int = 0) -> dict[str, list[int]]:
        """Serve the jobs as the servers do: each reserves at decode when decode has room (back-pressure:
        the others wait), is prefilled, and commits (one every `join_every` decode steps when > 0)."""
        pending, ready = list(jobs), []
        tokens: dict[str, list[int]] = {job.request_id: [] for job in jobs}
        steps = 0
        while pending or ready or self.decode.active:
            admitted = []
            while pending and (blocks := self._reserve(pending[0])) is not None:
                admitted.append((pending.pop(0), blocks))
            ready += self._prefill(admitted) if admitted else []
            assert ready or self.decode.active or not pending, "decode never had room for a waiting job"
            while ready and (join_every == 0 or steps % join_every == 0):
                handoff = ready.pop(0)
                tokens[handoff.request_id].append(self.commit(handoff))
                if join_every:
                    break
            for event in self.decode.step():
                tokens[event.request_id].append(event.token_id)
            self.batch_sizes.append(len(self.decode.running))
            assert len(self.decode.running) <= self.decode.max_batch
            assert self.decode.blocks_held <= self.decode.max_blocks
            steps += 1
        return tokens
