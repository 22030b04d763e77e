"""A worker process keeps one multi-threaded OpenMP team, its engine thread's
(`engine.thread_teams`): the event loop's thread and its helper threads run
torch ops on one thread, so they open no team of their own. Each case runs in a
fresh interpreter, because teams live as long as their threads; teams are
counted as the OS threads they add."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = """
import asyncio, json, os, torch
from epd.workers.engine.thread_teams import pinned_executor
from epd.workers.stages.worker import WorkerConfig, confine_teams

def os_threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    torch.ones(1 << 22).sum()  # 4M elements: a parallel region on every thread the caller may use
    return torch.get_num_threads()

async def main(confined):
    config = WorkerConfig(role="colocated", model="tiny-llava", redis_url="redis://127.0.0.1:1", torch_threads=2)
    if confined:
        config = confine_teams(config)
    else:
        torch.set_num_threads(2)
    engine = pinned_executor(config.torch_threads, 1, "engine")  # as WorkerContext builds it
    loop = asyncio.get_running_loop()
    before = os_threads()
    counts = [await loop.run_in_executor(engine, parallel_op), parallel_op(), await asyncio.to_thread(parallel_op)]
    print(json.dumps({"counts": counts, "new_threads": os_threads() - before}))

asyncio.run(main(CONFINED))
"""


def probe(confined: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.replace("CONFINED", str(confined))], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_only_the_engine_thread_runs_a_team():
    result = probe(confined=True)
    assert result["counts"] == [2, 1, 1]  # engine thread, event loop thread, a default-executor helper
    # the engine thread and its one OpenMP worker, and the helper thread; no team anywhere else
    assert result["new_threads"] == 3


def test_without_confinement_other_threads_open_teams():
    """The count above sees teams: unconfined, the event loop's thread and the helper each open one."""
    result = probe(confined=False)
    assert result["counts"] == [2, 2, 2]
    assert result["new_threads"] == 5


KERNEL_PROBE = """
import torch
from epd.workers.engine.cpu_attention import kernel, paged_decode
from epd.workers.engine.thread_teams import pinned_executor

if kernel() is None:
    print("no kernel")
    raise SystemExit
engine = pinned_executor(2, 1, "engine")
engine.submit(lambda: torch.ones(1 << 22).sum()).result()  # the engine thread runs its first ops on 2
pinned_executor(1, 1, "helper").submit(lambda: None).result()  # a helper starts: the process-wide count is 1

def attend():
    keys = torch.randn(4, 16, 2, 8)
    paged_decode(torch.randn(3, 2, 8), keys, torch.randn_like(keys), torch.tensor([[0, 1]] * 3),
                 torch.tensor([20, 5, 31]), 0.3)
    return torch.get_num_threads()

print(engine.submit(attend).result())  # the kernel's first call on the engine thread
"""


def test_the_attention_kernel_leaves_the_engine_threads_count_alone():
    """PyTorch's `at::parallel_for` sets a thread's count from the process-wide setting (the last count any
    thread chose) the first time it runs in a library on that thread: a decode kernel using it dropped the
    engine thread to the helpers' one thread at its first decode step, for good."""
    out = subprocess.run([sys.executable, "-c", KERNEL_PROBE], check=True, capture_output=True, text=True,
                         timeout=300).stdout.strip().splitlines()[-1]
    if out == "no kernel":
        pytest.skip("the CPU paged-attention kernel cannot be built here")
    assert out == "2"


async def test_every_engine_job_starts_on_the_engines_thread_count(redis_server):
    """Whatever a job leaves behind (foreign code may lower the engine thread's count), the next one runs on
    the worker's threads again."""
    from epd.workers.stages.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(role="colocated", model="tiny-llava", redis_url=redis_server.url, torch_threads=2))
    await worker.start()
    try:
        await worker.ctx.compute("decode", torch.set_num_threads, 1)
        assert await worker.ctx.compute("decode", torch.get_num_threads) == 2
        await worker.ctx.compute_shared(lambda: (torch.set_num_threads(1), {}))
        assert await worker.ctx.compute_shared(lambda: (torch.get_num_threads(), {})) == 2
    finally:
        await worker.stop()
