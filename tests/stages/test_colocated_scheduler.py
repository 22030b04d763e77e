"""A colocated worker's mixed steps: a prompt prefilled in one step decodes in the
very next one, even while other prompts keep the loop stepping. Runs a real
colocated tiny-llava worker (gRPC over a socket, real Redis)."""

from __future__ import annotations

import asyncio

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
    """Steps of 16 tokens, so a 100-token prompt prefills over several steps."""
    worker = Worker(WorkerConfig(role="colocated", model="tiny-llava", redis_url=redis_server.url,
                                 step_token_budget=16, decode_max_batch=4))
    await worker.start()
    yield worker
    await worker.stop()


async def test_a_prompt_decodes_in_the_step_after_its_prefill_while_a_long_prompt_goes_on(small_step_worker,
                                                                                          monkeypatch):
    worker = small_step_worker
    prefill = next(s for s in worker.servicers if isinstance(s, PrefillServicer))
    decode = next(s for s in worker.servicers if isinstance(s, DecodeServicer))
    stepper, ctx = worker.scheduler.stepper, worker.ctx
    real_step, real_compute, gate = stepper.step, ctx.compute_shared, asyncio.Event()
    steps: list[tuple[int, int]] = []  # (decode rows, prefill tokens) per step

    def recorded_step():
        result = real_step()
        steps.append((result.decode_tokens, result.prefill_tokens))
        return result

    async def gated_compute(fn, *args):
        await gate.wait()  # the first step waits until both prompts are queued
        return await real_compute(fn, *args)
    monkeypatch.setattr(stepper, "step", recorded_step)
    monkeypatch.setattr(ctx, "compute_shared", gated_compute)

    sampling = sampling_to_proto(SamplingParams(max_tokens=3, ignore_eos=True))
    short = pb.PrefillRequest(request_id="short", input_ids=[1, 10, 11, 12, 13, 14, 15, 16],
                              decode_address=worker.ctx.address, sampling=sampling)
    long = pb.PrefillRequest(request_id="long", input_ids=[1] + [10 + i % 50 for i in range(99)],
                             decode_address=worker.ctx.address, sampling=sampling)
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
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
        tokens = {r: [t for chunk in [c async for c in stream] for t in chunk.token_ids]
                  for r, stream in streams.items()}

    assert {r: len(t) for r, t in tokens.items()} == {"short": 3, "long": 3}
    # step 1: the short prompt whole and the long one's first chunk; from step 2 on the short prompt
    # decodes beside the long one's chunks (a step later, it would have sat out step 2)
    assert steps[0] == (0, 16)
    assert steps[1] == (1, 15) and steps[2] == (1, 15)
    assert sum(prefill_tokens for _, prefill_tokens in steps) == 108
    assert decode.engine.allocator.used == 0
