"""A cancellation must reach the loops it stops, even when the awaited call
finishes at the same moment or a library swallows the CancelledError (redis-py
does, through Python 3.11's `asyncio.wait_for`). Otherwise a stopped worker
heartbeats on and `stop()` waits forever: the hang that CI met once."""

from __future__ import annotations

import asyncio

import pytest

from epd.workers.background import periodically
from epd.workers.stages.batching import MicroBatcher
from epd.workers.timeouts import within

pytestmark = pytest.mark.timeout(60)


async def test_within_keeps_a_cancellation_that_meets_the_result():
    result = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(within(result, 60))
    await asyncio.sleep(0)  # one turn of the loop: the task now waits on `result`
    result.set_result("done")
    task.cancel()  # in the same turn: asyncio.wait_for would return "done" here
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_within_raises_timeout_error_and_cancels_the_call():
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await within(never, 0.01)
    assert never.cancelled()


async def test_a_periodic_loop_stops_even_when_its_step_swallows_the_cancellation():
    steps, inside = 0, asyncio.Event()

    async def swallowing_step() -> None:
        nonlocal steps
        steps += 1
        inside.set()
        try:
            await asyncio.get_running_loop().create_future()  # a call that only a cancellation ends
        except asyncio.CancelledError:
            pass  # what the library does with it

    task = asyncio.create_task(periodically(0, swallowing_step, "a test step"))
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == 1


async def test_a_periodic_loop_logs_a_failing_step_and_goes_on(caplog):
    calls = asyncio.Queue()

    async def failing_step() -> None:
        calls.put_nowait(None)
        raise RuntimeError("redis is away")

    task = asyncio.create_task(periodically(0, failing_step, "a test step"))
    for _ in range(3):
        await calls.get()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "a test step failed" in caplog.text


async def test_a_batcher_stops_even_when_its_batch_swallows_the_cancellation():
    inside = asyncio.Event()

    async def swallowing_batch(batch: list[int]) -> None:
        inside.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            pass

    batcher = MicroBatcher("test", swallowing_batch, max_cost=4, max_wait=0.0, fail_batch=lambda batch, exc: None)
    batcher.start()
    batcher.submit(1)
    await inside.wait()
    await batcher.stop()  # would wait forever if the loop went back to its queue
