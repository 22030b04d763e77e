"""Greedy E->P->D (vision encode -> merge -> packed, chunked prefill into the
paged pool -> KV bytes -> continuous-batching decode over its own pool) equals
`model.generate` token for token, for every family."""

from __future__ import annotations

import pytest

from .conftest import Stages, png_bytes
from .driver import MAX_NEW, Engines, make_job, mixed_jobs
from .reference import reference_generate


def test_single_requests_match_generate(stages: Stages):
    for n_images in (0, 1, 4):
        images = [png_bytes(40 + 13 * i, 30 + 7 * i, seed=i) for i in range(n_images)]
        job = make_job(stages, f"r{n_images}", "Describe the image in detail.", images)
        expected = reference_generate(stages.adapter, stages.full, job.input_ids, images, MAX_NEW)
        assert Engines.build(stages).run([job])[job.request_id] == expected, f"{n_images} images"


@pytest.mark.parametrize("attention", ["sdpa", "cpu-paged"])
def test_mixed_batch_with_joins_and_leaves_matches_generate(stages: Stages, attention: str):
    """Prompts of different lengths packed in one prefill; in decode they join every 3 steps and
    leave at different steps (different max_tokens). Both CPU attention backends."""
    jobs, expected = mixed_jobs(stages)
    for index, job in enumerate(jobs):
        job.sampling = type(job.sampling)(max_tokens=MAX_NEW - index, ignore_eos=True)
        expected[job.request_id] = expected[job.request_id][:MAX_NEW - index]
    engines = Engines.build(stages, attention=attention)
    assert engines.decode_runtime.decoder.attention.name == attention
    assert engines.run(jobs, join_every=3) == expected
    assert engines.prefill.allocator.used == 0 and engines.decode.allocator.used == 0


def test_in_process_handoff_adopts_the_prefill_blocks(stages: Stages):
    """Prefill and decode in one process share the pool: decode adopts the prompt's blocks (no KV is
    copied, the prefix cache stays shared) and the output is still exact."""
    jobs, expected = mixed_jobs(stages, 5)
    engines = Engines.build(stages, shared=True)
    assert engines.run(jobs, join_every=2) == expected
    assert engines.prefill.allocator.used == 0 and engines.decode.blocks_held == 0


def test_chunked_prefill_of_prompts_longer_than_the_budget_matches_generate(stages: Stages):
    jobs, expected = mixed_jobs(stages, 4)
    budget = 13  # smaller than every prompt: each is prefilled in several chunks, packed with others
    assert all(len(job.input_ids) > budget for job in jobs)
    engines = Engines.build(stages, token_budget=budget)
    assert engines.run(jobs) == expected


def test_preemption_when_decode_runs_out_of_blocks_matches_generate(stages: Stages):
    """A decode pool with room for about two sequences: growing sequences preempt the newest
    (swapped out to host memory, back in later), and every output is still exact."""
    jobs, expected = mixed_jobs(stages, 4)
    longest = max(len(job.input_ids) for job in jobs) + MAX_NEW
    block_bytes = Engines.build(stages).decode_runtime.pool.layout.bytes_per_block
    engines = Engines.build(stages, decode_bytes=(2 * longest // 4 + 2) * block_bytes)
    assert engines.run(jobs) == expected
    assert engines.decode.stats.preemptions > 0
    assert engines.decode.allocator.used == 0
