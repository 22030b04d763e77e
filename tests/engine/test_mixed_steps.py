"""A colocated worker's steps: the decode tokens of every running sequence and the
scheduled prefill chunks in one forward (decode rows through the paged kernel,
prefill chunks through SDPA) give `model.generate`'s tokens, a step never holds
more tokens than its budget (decode rows first), and a step that fails fails
exactly its requests and gives every block back."""

from __future__ import annotations

import pytest

from epd.workers.engine.mixed import DEFAULT_STEP_TOKENS, MixedStepper
from epd.workers.messages import PrefillJob
from epd.workers.stages.worker import WorkerConfig

from ..helpers import worker_from_command_line
from .conftest import Stages
from .driver import Engines, mixed_jobs


def arrive(engines: Engines, job: PrefillJob) -> None:
    """What the colocated servers do for a new request: decode makes room for the blocks prefill will hand
    over, then prefill takes the prompt."""
    assert engines.decode.reserve(job.request_id, len(job.input_ids), job.sampling.max_tokens, adopt=True) == []
    engines.prefill.add(job)


def serve(engines: Engines, jobs: list[PrefillJob],
          step_tokens: int = DEFAULT_STEP_TOKENS) -> tuple[dict[str, list[int]], int]:
    """One prompt arrives per step; the tokens per request and how many steps mixed both engines."""
    stepper = MixedStepper(engines.prefill, engines.decode, step_tokens)
    tokens: dict[str, list[int]] = {job.request_id: [] for job in jobs}
    pending, mixed = list(jobs), 0
    while pending or stepper.has_work:
        if pending:
            arrive(engines, pending.pop(0))
        result = stepper.step()
        assert result.error is None and not result.failed
        mixed += bool(result.prefill_tokens and result.decode_tokens)
        assert result.prefill_tokens + result.decode_tokens <= step_tokens
        for event in result.decode:
            tokens[event.request_id].append(event.token_id)
        for done in result.prefill:
            assert done.handoff is not None
            engines.prefill.release(done.request_id, adopted=True)
            tokens[done.request_id].append(engines.decode.commit(done.handoff, done.handoff.block_table).token_id)
        assert len(engines.decode.running) <= engines.decode.max_batch
    return tokens, mixed


@pytest.mark.parametrize("attention", ["sdpa", "cpu-paged"])
def test_mixed_steps_match_generate(stages: Stages, attention: str):
    """Prompts arrive while others decode and a small token budget chunks them, so most forwards carry
    decode rows and prefill chunks (one of a single token among them) together."""
    jobs, expected = mixed_jobs(stages)
    engines = Engines.build(stages, token_budget=11, attention=attention, shared=True)
    assert engines.decode_runtime.decoder.attention.name == attention
    tokens, mixed = serve(engines, jobs)
    assert tokens == expected
    assert mixed > len(jobs)
    assert engines.prefill.allocator.used == 0 and engines.decode.blocks_held == 0


def test_a_step_budget_counts_decode_rows_first_and_chunks_the_prompts(stages: Stages):
    """The prefill engine's own budget is large, the step's small: the decode rows of a step take their
    share first and the prompts are chunked into the rest, and the tokens still equal `generate`'s."""
    jobs, expected = mixed_jobs(stages)
    engines = Engines.build(stages, token_budget=8192, max_batch=len(jobs), shared=True)
    step_tokens = len(jobs) + 3
    assert max(len(job.input_ids) for job in jobs) > step_tokens
    tokens, mixed = serve(engines, jobs, step_tokens)
    assert tokens == expected
    assert mixed > len(jobs)
    assert engines.prefill.allocator.used == 0 and engines.decode.blocks_held == 0


def test_a_step_budget_must_leave_prefill_room_beside_a_full_decode_batch(stages: Stages):
    engines = Engines.build(stages, max_batch=16, shared=True)
    with pytest.raises(ValueError, match=r"tokens per mixed step \(16\) must exceed the decode batch limit \(16\)"):
        MixedStepper(engines.prefill, engines.decode, step_tokens=16)
    with pytest.raises(ValueError, match=r"step_token_budget \(64\) must exceed decode_max_batch \(64\)"):
        WorkerConfig(role="colocated", model="tiny-llava", redis_url="redis://unused", step_token_budget=64)
    WorkerConfig(role="prefill", model="tiny-llava", redis_url="redis://unused", step_token_budget=64)  # unused there


def test_a_failed_mixed_step_fails_its_requests_and_frees_their_blocks(stages: Stages,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """The forward raises (as out of memory would; injected, nothing here can exhaust memory on cue): the
    prompts of the step and the decoding sequences get the error, every block goes back, and the next
    request is served exactly."""
    jobs, expected = mixed_jobs(stages, 3)
    engines = Engines.build(stages, token_budget=11, shared=True)
    stepper = MixedStepper(engines.prefill, engines.decode)
    arrive(engines, jobs[0])
    while not engines.decode.running:  # the first request decodes ...
        for done in stepper.step().prefill:
            assert done.handoff is not None
            engines.prefill.release(done.request_id, adopted=True)
            engines.decode.commit(done.handoff, done.handoff.block_table)
        engines.decode.prepare()
    arrive(engines, jobs[1])  # ... when the second one's prefill joins its step
    decoder = engines.decode.decoder
    monkeypatch.setattr(decoder, "forward", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no memory")))
    result = stepper.step()
    assert result.prefill_tokens and result.decode_tokens
    assert [done.request_id for done in result.prefill] == [jobs[1].request_id]
    assert all(isinstance(done.error, RuntimeError) for done in result.prefill)
    assert result.failed == [jobs[0].request_id] and isinstance(result.error, RuntimeError)
    engines.decode.release(jobs[1].request_id)  # the servers give back the failed request's room
    assert engines.prefill.allocator.used == 0 and engines.decode.blocks_held == 0
    monkeypatch.undo()
    tokens, _ = serve(engines, jobs[2:])
    assert tokens == {jobs[2].request_id: expected[jobs[2].request_id]}


async def test_a_colocated_worker_steps_under_the_budget_its_command_line_names(redis_server):
    worker = worker_from_command_line("--role", "colocated", "--model", "tiny-llava", "--redis-url",
                                      redis_server.url, "--step-token-budget", "512")
    await worker.start()
    try:
        assert worker.scheduler is not None and worker.scheduler.stepper.step_tokens == 512
    finally:
        await worker.stop()
