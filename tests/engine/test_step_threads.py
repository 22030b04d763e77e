"""Small forwards on one CPU thread (`--small-step-tokens`): the thread count
drops only around forwards of that many tokens or fewer, and comes back after
(even when the forward fails); outputs stay exact against `model.generate`; and
the compiled layers hold graphs for both thread counts from start-up on (no
compile under a request)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from epd.workers.engine.step_threads import StepThreads
from epd.workers.stages.worker import WorkerConfig

from .conftest import Stages
from .driver import Engines, mixed_jobs
from .test_compiled_layers import SIZES, cpu_runtime, packed_logits, warm_logits

CPU = torch.device("cpu")


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two intra-op threads whatever this machine has (the policy does nothing on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_only_small_cpu_forwards_drop_to_one_thread(two_threads):
    threads = StepThreads(small_step_tokens=4)
    with threads.for_forward(CPU, 4):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    for device, tokens in ((CPU, 5), (torch.device("cuda"), 1)):
        with threads.for_forward(device, tokens):
            assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="forward failed"), threads.for_forward(CPU, 1):
        raise RuntimeError("forward failed")
    assert torch.get_num_threads() == 2
    with StepThreads().for_forward(CPU, 1):  # off by default
        assert torch.get_num_threads() == 2
    assert threads.counts(CPU) == [2, 1] and StepThreads().counts(CPU) == [2]


def test_a_negative_token_count_is_rejected():
    with pytest.raises(ValueError, match="small_step_tokens must be >= 0"):
        StepThreads(-1)
    with pytest.raises(ValueError, match="small_step_tokens must be >= 0"):
        WorkerConfig(role="decode", model="tiny-llava", redis_url="redis://unused", small_step_tokens=-1)


def test_single_thread_decode_steps_match_generate(stages: Stages, two_threads):
    """Sequences join every 2 steps and leave at different steps: decode batches of 1-4 tokens run on
    one thread, larger ones and the prefill on two; every output equals `generate`'s."""
    jobs, expected = mixed_jobs(stages, 6)
    for index, job in enumerate(jobs):
        job.sampling = type(job.sampling)(max_tokens=12 - index, ignore_eos=True)
        expected[job.request_id] = expected[job.request_id][:12 - index]
    engines = Engines.build(stages, threads=StepThreads(small_step_tokens=4))
    assert engines.run(jobs, join_every=2) == expected
    assert torch.get_num_threads() == 2


def test_compiled_layers_are_ready_for_both_thread_counts(two_threads):
    runtime, vocab = cpu_runtime("tiny-llava", threads=StepThreads(small_step_tokens=4))
    assert runtime.decoder.dense.compiled
    for sizes in ((1,), (2, 1), (1, 1, 1, 1), SIZES):  # one thread for the first three, two for the last
        warm_logits(runtime, vocab, sizes)


def test_a_graph_warm_up_missed_is_compiled_not_failed(two_threads):
    """A forward on a thread count warm-up never saw (one the worker would not use) finds no graph: it gets
    one compiled then, as with Dynamo's guards checked, and the same logits as on the warmed-up count."""
    runtime, vocab = cpu_runtime("tiny-llava", threads=StepThreads(small_step_tokens=4))
    expected = warm_logits(runtime, vocab, SIZES)
    graphs = counters["stats"]["unique_graphs"]
    torch.set_num_threads(3)
    try:
        logits = packed_logits(runtime, vocab, SIZES)
    finally:
        torch.set_num_threads(2)
    assert counters["stats"]["unique_graphs"] > graphs
    torch.testing.assert_close(logits, expected, atol=0.02 * float(expected.abs().max()), rtol=0.0)
