"""A colocated worker's mixed steps lose no step to the event loop: a prompt
prefilled in one step decodes in the very next one, and a prompt that came during
a step is prefilled in the very next one, while other prompts keep the loop
stepping. Runs a real colocated tiny-llava worker (gRPC over a socket, real Redis)
with steps of 16 tokens, so that a long prompt prefills over several steps."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc
from epd.workers.messages import SamplingParams
from epd.workers.stages.decode import DecodeServicer
from epd.workers.stages.prefill import PrefillServicer
from epd.workers.stages.worker import Worker, WorkerConfig
from epd.workers.wire import sampling_to_proto

from ..helpers import eventually

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def small_step_worker(redis_server):
    worker = Worker(WorkerConfig(role="colocated", model="tiny-llava", redis_url=redis_server.url,
                                 step_token_budget=16, decode_max_batch=4))
    await worker.start()
    yield worker
    await worker.stop()


class StepLog:
    """(decode rows, prefill tokens) of each step; `hold` keeps one step on the compute thread until
    `release()`, as a long step would run."""

    def __init__(self, worker: Worker, monkeypatch, hold: int = -1) -> None:
        self.steps: list[tuple[int, int]] = []
        self.hold, self.holding, self.released = hold, threading.Event(), threading.Event()
        self._step = worker.scheduler.stepper.step
        monkeypatch.setattr(worker.scheduler.stepper, "step", self._recorded)

    def _recorded(self):
        result = self._step()
        self.steps.append((result.decode_tokens, result.prefill_tokens))
        if len(self.steps) - 1 == self.hold:
            self.holding.set()
            self.released.wait(60)
        return result

    def release(self) -> None:
        self.released.set()


def prompt(worker: Worker, request_id: str, length: int) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=request_id, input_ids=[1] + [10 + i % 50 for i in range(length - 1)],
                             decode_address=worker.ctx.address,
                             sampling=sampling_to_proto(SamplingParams(max_tokens=3, ignore_eos=True)))


def servicers(worker: Worker) -> tuple[PrefillServicer, DecodeServicer]:
    return (next(s for s in worker.servicers if isinstance(s, PrefillServicer)),
            next(s for s in worker.servicers if isinstance(s, DecodeServicer)))


async def token_counts(streams: dict) -> dict[str, int]:
    return {r: sum([len(chunk.token_ids) async for chunk in stream]) for r, stream in streams.items()}


async def test_a_prompt_decodes_in_the_step_after_its_prefill_while_a_long_prompt_goes_on(small_step_worker,
                                                                                          monkeypatch):
    worker = small_step_worker
    prefill, decode = servicers(worker)
    log = StepLog(worker, monkeypatch)
    ctx, gate = worker.ctx, asyncio.Event()
    compute_shared = ctx.compute_shared

    async def gated(fn, *args):
        await gate.wait()  # the first step waits until both prompts are queued
        return await compute_shared(fn, *args)
    monkeypatch.setattr(ctx, "compute_shared", gated)

    short, long = prompt(worker, "short", 8), prompt(worker, "long", 100)
    async with grpc.aio.insecure_channel(ctx.address) as channel:
        prefill_stub, decode_stub = pb_grpc.PrefillServiceStub(channel), pb_grpc.DecodeServiceStub(channel)
        streams = {r.request_id: decode_stub.Generate(pb.GenerateRequest(request_id=r.request_id), timeout=60)
                   for r in (short, long)}
        await eventually(lambda: len(decode.arrival_events) == 2, 30, "both token streams to wait for their KV")
        calls = [asyncio.ensure_future(prefill_stub.Prefill(short, timeout=60))]
        await eventually(lambda: prefill.queue_depth == 1, 30, "the short prompt to be queued")
        calls.append(asyncio.ensure_future(prefill_stub.Prefill(long, timeout=60)))
        await eventually(lambda: prefill.queue_depth == 2, 30, "the long prompt to be queued")
        gate.set()
        await asyncio.gather(*calls)
        assert await token_counts(streams) == {"short": 3, "long": 3}

    # step 1: the short prompt whole and the long one's first chunk; from step 2 on the short prompt
    # decodes beside the long one's chunks (a step later, it would have sat out step 2)
    assert log.steps[0] == (0, 16)
    assert log.steps[1] == (1, 15) and log.steps[2] == (1, 15)
    assert sum(prefill_tokens for _, prefill_tokens in log.steps) == 108
    assert decode.engine.allocator.used == 0


async def test_a_prompt_that_comes_during_a_step_is_prefilled_in_the_next_step(small_step_worker, monkeypatch):
    worker = small_step_worker
    prefill, decode = servicers(worker)
    log = StepLog(worker, monkeypatch, hold=1)
    long, short = prompt(worker, "long", 20), prompt(worker, "short", 8)
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
        prefill_stub, decode_stub = pb_grpc.PrefillServiceStub(channel), pb_grpc.DecodeServiceStub(channel)
        streams = {r.request_id: decode_stub.Generate(pb.GenerateRequest(request_id=r.request_id), timeout=60)
                   for r in (long, short)}
        await eventually(lambda: len(decode.arrival_events) == 2, 30, "both token streams to wait for their KV")
        calls = [asyncio.ensure_future(prefill_stub.Prefill(long, timeout=60))]
        await eventually(log.holding.is_set, 30, "the long prompt's second step to run")
        calls.append(asyncio.ensure_future(prefill_stub.Prefill(short, timeout=60)))
        # its reservation waits on the compute thread behind the step
        await eventually(lambda: "short" in prefill.admitting, 30, "the short prompt to reserve its KV")
        log.release()
        await asyncio.gather(*calls)
        assert await token_counts(streams) == {"long": 3, "short": 3}

    # the long prompt's two chunks; then its first decode row beside the whole short prompt (a step
    # later, the short prompt would have sat out step 3)
    assert log.steps[:3] == [(0, 16), (0, 4), (1, 8)]
    assert decode.engine.allocator.used == 0
