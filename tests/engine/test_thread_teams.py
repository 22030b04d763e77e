"""A worker process keeps one multi-threaded OpenMP team, its engine thread's
(`engine.thread_teams`): the event loop's thread and its helper threads run
torch ops on one thread, so they open no team of their own. Each case runs in a
fresh interpreter, because teams live as long as their threads; teams are
counted as the OS threads they add."""

from __future__ import annotations

import json
import subprocess
import sys

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
