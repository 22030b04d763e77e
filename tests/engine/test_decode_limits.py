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
    """Twelve requests at once against a batch of 3 and 160 KV tokens: reservations beyond the limits
    wait (back-pressure), the batch and the blocks held never exceed them (asserted at every step by
    the driver), and all complete."""
    max_batch, max_kv_tokens, block = 3, 160, 4
    engines = Engines.build(llava, block_size=block, max_batch=max_batch, max_kv_tokens=max_kv_tokens)
    jobs = [make_job(llava, f"f{i}", "Count to ten, slowly." * (1 + i % 3), [], max_tokens=10 + i)
            for i in range(12)]
    tokens = engines.run(jobs)
    assert {request_id: len(out) for request_id, out in tokens.items()} == {f"f{i}": 10 + i for i in range(12)}
    assert max(engines.batch_sizes) == max_batch
    assert engines.decode.allocator.used == 0 and engines.decode.blocks_held == 0
    assert engines.prefill.allocator.used == 0


def test_a_sequence_that_can_never_fit_is_refused(llava: Stages):
    engines = Engines.build(llava, block_size=4, max_kv_tokens=64)
    job = make_job(llava, "big", "Tell me everything.", [], max_tokens=100)
    with pytest.raises(SequenceTooLong, match="need 3[0-9] KV blocks; this decode worker holds at most 16"):
        engines.decode.reserve(job.request_id, len(job.input_ids), 100)
    assert engines.decode.holders == 0 and engines.decode.allocator.used == 0
    job.sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    assert len(engines.run([job])["big"]) == 20
    assert engines.decode.allocator.used == 0
