"""Greedy E->P->D (vision encode -> merge -> batched prefill -> KV bytes ->
continuous-batching decode) equals `model.generate` token for token."""

from __future__ import annotations

from epd.workers.engine import DecodeEngine, PrefillEngine
from epd.workers.engine.tensors import pack, unpack
from epd.workers.messages import ChatMessage, ImagePart, KVHandoff, PrefillJob, SamplingParams, TextPart
from epd.workers.models import EncodeInput

from .conftest import Stages, png_bytes
from .reference import image_size, reference_generate

MAX_NEW = 12


def make_job(stages: Stages, request_id: str, text: str, images: list[bytes]) -> PrefillJob:
    sizes = [image_size(data) for data in images]
    parts = tuple([ImagePart(i) for i in range(len(images))] + [TextPart(text)])
    ids = stages.adapter.build_prompt([ChatMessage("user", parts)], sizes)
    embeddings = []
    for data, size in zip(images, sizes):
        items = [EncodeInput(data, tile) for tile in range(len(stages.adapter.image_items(size)))]
        # encode each item on its own, as if spread over several encode workers
        per_item = [stages.vision.encode([item])[0] for item in items]
        embeddings.append(stages.language.merge_image(size, per_item))
    sampling = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    return PrefillJob(request_id, ids, embeddings, sizes, sampling)


def through_the_wire(handoff: KVHandoff) -> KVHandoff:
    handoff.layers = [(unpack(pack(k)), unpack(pack(v))) for k, v in handoff.layers]
    return handoff


def run_epd(stages: Stages, jobs: list[PrefillJob], join_every: int = 0,
            prefill: PrefillEngine | None = None) -> dict[str, list[int]]:
    """Prefill all jobs in one batch, then decode; with join_every > 0 sequences join mid-way."""
    prefill = prefill or PrefillEngine(stages.language, stages.adapter)
    handoffs = [through_the_wire(h) for h in prefill.run(jobs)]
    decode = DecodeEngine(stages.language, stages.adapter, max_batch=16)
    tokens: dict[str, list[int]] = {job.request_id: [] for job in jobs}
    waiting = list(handoffs)
    steps = 0
    while waiting or decode.active:
        if waiting and (join_every == 0 or steps % join_every == 0):
            tokens[waiting[0].request_id].append(decode.add(waiting.pop(0)).token_id)
            if join_every == 0:
                continue
        for event in decode.step():
            tokens[event.request_id].append(event.token_id)
        steps += 1
    return tokens


def test_single_requests_match_generate(stages: Stages):
    for n_images in (0, 1, 4):
        images = [png_bytes(40 + 13 * i, 30 + 7 * i, seed=i) for i in range(n_images)]
        job = make_job(stages, f"r{n_images}", "Describe the image in detail.", images)
        expected = reference_generate(stages.adapter, stages.full, job.input_ids, images, MAX_NEW)
        assert run_epd(stages, [job])[job.request_id] == expected, f"{n_images} images"


def test_mixed_batch_with_joins_matches_generate(stages: Stages):
    texts = ["What is shown?", "How many objects are there in this photo today?", "Hello", "Red, green, blue.",
             "Describe the weather.", "The cat sat on the mat.", "One, two, three", "Explain step by step."]
    jobs, expected = [], {}
    for i, text in enumerate(texts):
        images = [png_bytes(36 + 5 * i + 9 * k, 28 + 3 * k, seed=100 + 10 * i + k) for k in range(i % 3)]
        job = make_job(stages, f"mix{i}", text, images)
        jobs.append(job)
        expected[job.request_id] = reference_generate(stages.adapter, stages.full, job.input_ids, images, MAX_NEW)
    assert run_epd(stages, jobs, join_every=3) == expected
