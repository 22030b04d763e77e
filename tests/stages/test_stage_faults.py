"""Stage loops never die silently: a failing batch fails only its requests, bad
pushed embeddings and decompression bombs are refused with INVALID_ARGUMENT,
and a loop that ends anyway turns the worker NOT_SERVING and removes it from
discovery. Runs a real colocated worker (gRPC over a socket, real Redis)."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc
from epd.workers.messages import SamplingParams
from epd.workers.registry import KEY_PREFIX
from epd.workers.stages.batching import MicroBatcher
from epd.workers.stages.prefill import PrefillServicer
from epd.workers.stages.worker import Worker
from epd.workers.wire import sampling_to_proto, tensor_to_proto

from ..helpers import eventually, png_bytes

pytestmark = pytest.mark.timeout(300)


async def test_a_failing_batch_fails_only_its_items_and_the_loop_goes_on():
    failed: list[tuple[list[int], str]] = []
    ran: list[list[int]] = []

    async def run(batch: list[int]) -> None:
        if 0 in batch:
            raise RuntimeError("device out of memory")
        ran.append(batch)

    batcher = MicroBatcher("test", run, max_cost=8, max_wait=0.0,
                           fail_batch=lambda batch, exc: failed.append((batch, str(exc))))
    batcher.start()
    batcher.submit(0)
    await eventually(lambda: failed, 30, "the failing batch to run")
    batcher.submit(1)
    await eventually(lambda: ran, 30, "the next batch to run")
    await batcher.stop()
    assert failed == [([0], "device out of memory")] and ran == [[1]]


def bomb_png() -> bytes:
    """A 15000x15000 PNG of a few dozen KB: PIL refuses it as a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def prefill_request(worker: Worker, request_id: str, text_ids: list[int]) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=request_id, input_ids=text_ids, decode_address=worker.ctx.address,
                             sampling=sampling_to_proto(SamplingParams(max_tokens=2, ignore_eos=True)))


async def generate(worker: Worker, stub_decode, request: pb.PrefillRequest, stub_prefill) -> list[int]:
    stream = stub_decode.Generate(pb.GenerateRequest(request_id=request.request_id), timeout=60)
    await stub_prefill.Prefill(request, timeout=60)
    return [t for chunk in [c async for c in stream] for t in chunk.token_ids]


async def test_bad_inputs_and_a_failed_batch_leave_the_worker_serving(worker, redis_server, monkeypatch):
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
        encode, prefill = pb_grpc.EncodeServiceStub(channel), pb_grpc.PrefillServiceStub(channel)
        decode = pb_grpc.DecodeServiceStub(channel)
        good = pb.EncodeItem(item_key="good", image=png_bytes(40, 30, seed=1), tile_index=-1, n_tokens=16)

        with pytest.raises(grpc.aio.AioRpcError) as bomb:
            await encode.Encode(pb.EncodeRequest(request_id="bomb", items=[
                pb.EncodeItem(item_key="bomb", image=bomb_png(), tile_index=-1, n_tokens=16)]), timeout=60)
        assert bomb.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decompression bomb" in bomb.value.details()
        assert list((await encode.Encode(pb.EncodeRequest(request_id="ok", items=[good]), timeout=60)).item_keys) == ["good"]

        wrong = pb.EmbeddingChunk(request_id="x", item_key="k", owner_address="nobody",
                                  embedding=tensor_to_proto(torch.zeros(16, 65)))
        with pytest.raises(grpc.aio.AioRpcError) as push:
            await prefill.PushEmbeddings(iter([wrong]), timeout=10)
        assert push.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[rows, 64]" in push.value.details()

        # A CUDA out-of-memory cannot happen on this CPU machine: the engine raises one once instead.
        servicer = next(s for s in worker.servicers if isinstance(s, PrefillServicer))
        decoder = servicer.engine.decoder
        real_forward = decoder.forward

        def out_of_memory_once(embeds, batch, on_layer=None):
            monkeypatch.setattr(decoder, "forward", real_forward)
            raise RuntimeError("CUDA out of memory")
        monkeypatch.setattr(decoder, "forward", out_of_memory_once)
        with pytest.raises(grpc.aio.AioRpcError) as oom:
            await prefill.Prefill(prefill_request(worker, "oom", [1, 10, 11, 12]), timeout=60)
        assert oom.value.code() == grpc.StatusCode.INTERNAL and "CUDA out of memory" in oom.value.details()

        tokens = await generate(worker, decode, prefill_request(worker, "after", [1, 10, 11, 12]), prefill)
        assert len(tokens) == 2
        assert servicer.engine.allocator.used == 0  # the failed batch's blocks went back to the pool

        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_a_loop_that_ends_turns_the_worker_not_serving_and_out_of_discovery(worker, redis_server):
    client = redis.Redis(port=redis_server.port)
    assert client.keys(KEY_PREFIX + "prefill:*")
    worker.scheduler._loop._task.cancel()  # the loop ends without stop(): a bug, from the worker's view
    await asyncio.wait_for(worker.ctx.health.dead.wait(), 10)
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            if (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        else:
            pytest.fail("health never turned NOT_SERVING")
    assert "colocated scheduler loop ended" in worker.ctx.health.reason
    assert not client.keys(KEY_PREFIX + "*")
