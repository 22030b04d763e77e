"""A colocated worker's mixed steps lose no step to the event loop: a prompt
prefilled in one step decodes in the very next one, and a prompt that came during
a step is prefilled in the very next one (an image prompt too, once the encode
batch that ran after the step has handed its embedding over), while other
prompts keep the loop stepping. Runs a real colocated tiny-llava worker (gRPC
over a socket, real Redis) with steps of 16 tokens, so that a long prompt
prefills over several steps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import pytest

from epd.image_size import ImageSize
from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc
from epd.workers.messages import ChatMessage, ImagePart, SamplingParams, TextPart
from epd.workers.models import load_adapter
from epd.workers.stages.worker import Worker, WorkerConfig
from epd.workers.wire import sampling_to_proto

from ..helpers import eventually, png_bytes

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


async def token_counts(streams: dict) -> dict[str, int]:
    return {r: sum([len(chunk.token_ids) async for chunk in stream]) for r, stream in streams.items()}


async def test_a_prompt_decodes_in_the_step_after_its_prefill_while_a_long_prompt_goes_on(small_step_worker,
                                                                                          monkeypatch):
    worker = small_step_worker
    prefill, decode = worker.scheduler.prefill, worker.scheduler.decode
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


async def arrive_during_a_step(worker: Worker, log: StepLog, late: pb.PrefillRequest, arrived: Callable[[], bool],
                               what: str, encode: pb.EncodeRequest | None = None) -> dict[str, int]:
    """A 20-token prompt prefills over steps 1 and 2, and step 2 is held on the compute thread while `late`
    (and its Encode call) comes, until `arrived()`: each request's token count."""
    decode = worker.scheduler.decode
    long = prompt(worker, "long", 20)
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
        prefill_stub, decode_stub = pb_grpc.PrefillServiceStub(channel), pb_grpc.DecodeServiceStub(channel)
        streams = {r.request_id: decode_stub.Generate(pb.GenerateRequest(request_id=r.request_id), timeout=60)
                   for r in (long, late)}
        await eventually(lambda: len(decode.arrival_events) == 2, 30, "both token streams to wait for their KV")
        calls = [asyncio.ensure_future(prefill_stub.Prefill(long, timeout=60))]
        await eventually(log.holding.is_set, 30, "the long prompt's second step to run")
        calls.append(asyncio.ensure_future(prefill_stub.Prefill(late, timeout=60)))
        if encode is not None:
            calls.append(asyncio.ensure_future(pb_grpc.EncodeServiceStub(channel).Encode(encode, timeout=60)))
        await eventually(arrived, 30, what)
        log.release()
        await asyncio.gather(*calls)
        return await token_counts(streams)


async def test_a_prompt_that_comes_during_a_step_is_prefilled_in_the_next_step(small_step_worker, monkeypatch):
    worker = small_step_worker
    prefill, decode = worker.scheduler.prefill, worker.scheduler.decode
    log = StepLog(worker, monkeypatch, hold=1)
    # its reservation waits on the compute thread behind the step
    counts = await arrive_during_a_step(worker, log, prompt(worker, "short", 8),
                                        lambda: prefill.arriving.get("short") == (), "the short prompt to reserve")
    assert counts == {"long": 3, "short": 3}

    # the long prompt's two chunks; then its first decode row beside the whole short prompt (a step
    # later, the short prompt would have sat out step 3)
    assert log.steps[:3] == [(0, 16), (0, 4), (1, 8)]
    assert decode.engine.allocator.used == 0


async def test_an_image_prompt_that_comes_during_a_step_is_prefilled_in_the_next_step(small_step_worker,
                                                                                      monkeypatch):
    worker = small_step_worker
    prefill, decode = worker.scheduler.prefill, worker.scheduler.decode
    log = StepLog(worker, monkeypatch, hold=1)
    ctx, computed = worker.ctx, []
    compute = ctx.compute

    async def recorded(stage, fn, *args):
        computed.append(stage)
        return await compute(stage, fn, *args)
    monkeypatch.setattr(ctx, "compute", recorded)

    image = png_bytes(40, 30, seed=7)
    item = pb.EncodeItem(item_key="img", image=image, tile_index=-1, n_tokens=16, dispatched=True)
    ref = pb.ImageRef(image_key="img", width=40, height=30,
                      items=[pb.EncodeItem(item_key="img", tile_index=-1, n_tokens=16, dispatched=True)])
    ids = load_adapter("tiny-llava").build_prompt([ChatMessage("user", (ImagePart(0), TextPart("What is it?")))],
                                                  [ImageSize(40, 30)])
    described = pb.PrefillRequest(request_id="image", input_ids=ids, images=[ref], decode_address=ctx.address,
                                  sampling=sampling_to_proto(SamplingParams(max_tokens=3, ignore_eos=True)))
    # the image's encode batch waits on the compute thread behind the step, and its prompt for it
    counts = await arrive_during_a_step(
        worker, log, described, lambda: "encode" in computed and "img" in prefill.embeddings.arrived,
        "the image's encode batch to be queued and its prompt to wait for it",
        encode=pb.EncodeRequest(request_id="image", items=[item], prefill_address=ctx.address))
    assert counts == {"long": 3, "image": 3}
    # the embedding went to the prompt before its cache record was written, and the Encode call
    # returned only once it was
    record = await ctx.metadata.get("img")
    assert record is not None and (record.state, record.owner) == ("ready", ctx.address)

    # the long prompt's two chunks; then its first decode row beside the image prompt's first chunk (a
    # step later, the image prompt would have sat out step 3)
    assert log.steps[:3] == [(0, 16), (0, 4), (1, 15)]
    assert decode.engine.allocator.used == 0
