"""Decode's limits are enforced: flooded beyond `max_batch`, `max_kv_tokens` and
the pool's size, the batch never exceeds them, every request completes, and
the pool's used blocks return to zero. A sequence that could never fit is
refused at once with a clear error."""

from __future__ import annotations

import pytest

from epd.workers.engine import SequenceTooLong
from epd.workers.messages import SamplingParams
from epd.workers.models import load_adapter

from .conftest import Stages
from .driver import Engines, make_job


@pytest.fixture(scope="module")
def llava() -> Stages:
    """The limits are the engine's, not the family's: one family suffices."""
    adapter = load_adapter("tiny-llava")
    return Stages(adapter, adapter.load_vision(), adapter.load_language(), full=None)


def test_a_flood_beyond_every_limit_completes_within_them(llava: Stages):
    max_batch, max_kv_tokens, block = 3, 160, 4
    engines = Engines.build(llava, block_size=block, max_batch=max_batch, max_kv_tokens=max_kv_tokens)
    jobs = [make_job(llava, f"f{i}", "Count to ten, slowly." * (1 + i % 3), [], max_tokens=10 + i)
            for i in range(12)]
    handoffs = engines.prefill_all(jobs)
    for handoff in handoffs:
        engines.decode.add(handoff)  # all twelve arrive at once
    done, steps = set(), 0
    while engines.decode.active:
        for event in engines.decode.step():
            if event.finish_reason:
                done.add(event.request_id)
        assert len(engines.decode.running) <= max_batch
        assert engines.decode.blocks_held * block <= max_kv_tokens
        steps += 1
    assert done == {job.request_id for job in jobs}
    assert engines.decode.stats.peak_batch == max_batch
    assert engines.decode.allocator.used == 0 and engines.decode.blocks_held == 0


def test_a_sequence_that_can_never_fit_is_refused(llava: Stages):
    engines = Engines.build(llava, block_size=4, max_kv_tokens=64)
    job = make_job(llava, "big", "Tell me everything.", [], max_tokens=100)
    handoff = engines.prefill_all([job])[0]
    with pytest.raises(SequenceTooLong, match="need 3[0-9] KV blocks; this decode worker holds at most 16"):
        engines.decode.add(handoff)
    assert engines.decode.active == 0 and engines.decode.allocator.used == 0
    handoff.sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    engines.decode.add(handoff)
    while engines.decode.active:
        engines.decode.step()
    assert engines.decode.allocator.used == 0
