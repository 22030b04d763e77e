"""The router's stage clients: the pipeline runs the same over gRPC and over the
in-process client (real servicers of a real colocated worker, no router-to-stage
sockets), and a failing stage call is attributed from its status and structured
metadata (epd.workers.wire), not from its text."""

from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import replace

import grpc
import pytest
from PIL import Image

from epd.image_size import ImageSize
from epd.workers.cache import MetadataStore
from epd.workers.messages import EncodeItem, PrefillCall, SamplingParams
from epd.workers.models import load_adapter
from epd.workers.redis_connection import connect
from epd.workers.registry import Peering, WorkerDirectory
from epd.workers.router.grpc_stage_client import GrpcStageClient
from epd.workers.router.images import FetchedImage
from epd.workers.router.inprocess_stage_client import InProcessStageClient, _Context
from epd.workers.router.pipeline import StageFailure, StagePipeline
from epd.workers.router.prepare import prepare
from epd.workers.router.prompt import PromptEncoder
from epd.workers.router.recovery import RecoveringStream
from epd.workers.router.routing import RoutePlanner
from epd.workers.router.schema import parse_chat_request
from epd.workers.router.stage_client import StageCallError
from epd.workers.transport.grpc_transport import ChannelPool
from epd.workers.wire import failed_peer, failed_peer_metadata

from ..helpers import eventually, png_bytes

pytestmark = pytest.mark.timeout(300)


def request(adapter, text: str, images: list[bytes], max_tokens: int = 6, block_size: int | None = 16):
    body = {"model": "tiny-llava", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                *({"type": "image_url", "image_url": {"url": "data:,"}} for _ in images),
                {"type": "text", "text": text}]}]}
    fetched = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            fetched.append(FetchedImage(data, ImageSize(*image.size)))
    return prepare(adapter, PromptEncoder(adapter), parse_chat_request(body), fetched, 16, block_size)


async def tokens(pipeline: StagePipeline, prepared) -> list[int]:
    return [t async for chunk in pipeline.attempt(prepared) for t in chunk.token_ids]


async def test_the_pipeline_gives_the_same_tokens_in_process_and_over_grpc(worker, redis_server):
    adapter = load_adapter("tiny-llava")
    redis = connect(redis_server.url)
    directory = WorkerDirectory(redis)
    await directory.refresh()
    channels = ChannelPool()
    clients = {"grpc": GrpcStageClient(channels),
               "in-process": InProcessStageClient({worker.ctx.address: worker.servicers})}
    try:
        produced = {}
        for name, client in clients.items():
            pipeline = StagePipeline(directory, MetadataStore(redis), client, RoutePlanner())
            produced[name] = [await tokens(pipeline, request(adapter, f"describe {n}", [png_bytes(32, 32, n)]))
                              for n in range(2)]
        assert produced["grpc"] == produced["in-process"]
        assert all(len(ids) == 6 for ids in produced["grpc"])
    finally:
        await clients["grpc"].close()
        await channels.close()
        await redis.aclose()


class CancelLog(InProcessStageClient):
    """The in-process client, noting every `Cancel` the pipeline sends."""

    def __init__(self, servicers) -> None:
        super().__init__(servicers)
        self.cancels: list[str] = []

    async def cancel(self, stage: str, address: str, request_id: str) -> bool:
        self.cancels.append(stage)
        return await super().cancel(stage, address, request_id)


async def reading_at_length(stream: RecoveringStream, adapter, text: str) -> asyncio.Task:
    """A client reading a 200-token answer, once its first token came (cancel it: the client leaves)."""
    started = asyncio.Event()

    async def read() -> None:
        async for _ in stream.run(request(adapter, text, [], max_tokens=200)):
            started.set()

    reader = asyncio.create_task(read())
    await eventually(started.is_set, 30, "the first token")
    return reader


async def test_only_a_request_left_unfinished_sends_the_stages_a_cancel(worker, redis_server):
    """The router's reader stops at the last chunk; that must not read as the client leaving (a `Cancel` for
    every finished request). A client that leaves earlier still cancels its request at decode."""
    adapter = load_adapter("tiny-llava")
    redis = connect(redis_server.url)
    directory = WorkerDirectory(redis)
    await directory.refresh()
    client = CancelLog({worker.ctx.address: worker.servicers})
    stream = RecoveringStream(StagePipeline(directory, MetadataStore(redis), client, RoutePlanner()), adapter)
    try:
        completions = [c async for c in stream.run(request(adapter, "all of it", []))]
        assert completions[-1].finish_reason == "length" and sum(len(c.token_ids) for c in completions) == 6
        assert client.cancels == []

        reader = await reading_at_length(stream, adapter, "leaving early")
        reader.cancel()  # the client goes away: aiohttp cancels its handler
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert client.cancels == ["decode"]
        await eventually(lambda: decode_idle(worker), 30, "decode to drop the request that left")
    finally:
        await redis.aclose()


class PrefillLog(InProcessStageClient):
    """The in-process client, noting the image bytes of every Prefill call."""

    def __init__(self, servicers) -> None:
        super().__init__(servicers)
        self.images: list[list[bytes]] = []

    async def prefill(self, address: str, call: PrefillCall) -> int:
        self.images.append([ref.image for ref in call.images])
        return await super().prefill(address, call)


async def test_a_colocated_prefill_call_carries_no_image_bytes_its_own_encode_stage_gets(worker, redis_server):
    """The Encode call brings a fresh image to the colocated worker; its Prefill call leaves the bytes out
    (1.4 MB less through gRPC for 4 images of 336x336). An image the cache already holds is not encoded: its
    bytes go with the Prefill call, which recomputes from them if the cached embedding cannot be had."""
    adapter = load_adapter("tiny-llava")
    redis = connect(redis_server.url)
    directory = WorkerDirectory(redis)
    await directory.refresh()
    client = PrefillLog({worker.ctx.address: worker.servicers})
    pipeline = StagePipeline(directory, MetadataStore(redis), client, RoutePlanner())
    image = png_bytes(40, 30, 7)
    try:
        first = await tokens(pipeline, request(adapter, "describe it", [image]))
        again = await tokens(pipeline, request(adapter, "describe it", [image]))
        assert client.images == [[b""], [image]]
        assert first == again and len(first) == 6
    finally:
        await redis.aclose()


async def test_a_prefill_without_the_image_bytes_it_would_recompute_from_fails_clearly(worker, redis_server):
    """An image sent without its bytes (its encode stage got them) whose embedding is nowhere: prefill says
    so (UNAVAILABLE, which the router retries as a whole) and holds nothing afterwards."""
    adapter = load_adapter("tiny-llava")
    prepared = request(adapter, "describe it", [png_bytes(40, 30, 8)])
    refs = [replace(ref, image=b"") for ref in prepared.images]
    client = InProcessStageClient({worker.ctx.address: worker.servicers})
    call = PrefillCall(prepared.request_id, prepared.input_ids, refs, prepared.sampling, worker.ctx.address)
    with pytest.raises(StageCallError) as failed:
        await client.prefill(worker.ctx.address, call)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert "the image's bytes were sent only to that stage" in failed.value.detail
    prefill = next(s for s in worker.servicers if hasattr(s, "Prefill"))
    assert prefill.active_requests == 0 and decode_idle(worker)
    assert prefill.engine.allocator.used == 0


class HeldDecodeCancel(InProcessStageClient):
    """The in-process client, whose `Cancel` to decode waits until `release` is set; it notes whether the
    pipeline left the request's decode stream."""

    def __init__(self, servicers) -> None:
        super().__init__(servicers)
        self.cancelling, self.release = asyncio.Event(), asyncio.Event()
        self.left = False

    def generate(self, address: str, request_id: str):
        stream = super().generate(address, request_id)
        leave = stream.cancel

        def noted_leave() -> None:
            self.left = True
            leave()

        stream.cancel = noted_leave
        return stream

    async def cancel(self, stage: str, address: str, request_id: str) -> bool:
        if stage == "decode":
            self.cancelling.set()
            await self.release.wait()
        return await super().cancel(stage, address, request_id)


async def test_a_handler_cancelled_again_while_it_cancels_its_stages_still_leaves_decode(worker, redis_server):
    """A streaming client that leaves fails the handler's write first, then cancels it while the stages are
    being told: the pipeline still leaves the decode stream and returns the planner's share."""
    adapter = load_adapter("tiny-llava")
    redis = connect(redis_server.url)
    directory = WorkerDirectory(redis)
    await directory.refresh()
    client = HeldDecodeCancel({worker.ctx.address: worker.servicers})
    planner = RoutePlanner()
    stream = RecoveringStream(StagePipeline(directory, MetadataStore(redis), client, planner), adapter)
    try:
        reader = await reading_at_length(stream, adapter, "leaving twice")
        reader.cancel()
        await eventually(client.cancelling.is_set, 30, "the pipeline to cancel the request at decode")
        reader.cancel()  # the second cancellation lands in the cleanup
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert client.left
        assert not +planner.sent_sequences and not +planner.sent_tokens  # its share of the workers returned
        client.release.set()
        await eventually(lambda: decode_idle(worker), 30, "decode to drop the request that left")
    finally:
        client.release.set()
        await redis.aclose()


@pytest.mark.parametrize("kind", ["grpc", "in-process"])
async def test_a_cancel_at_decode_ends_the_request_there_even_if_the_router_never_leaves_it(worker, redis_server,
                                                                                           kind):
    """Decode's `Cancel` ends the request's stream itself (CANCELLED on its Generate call or token feed):
    the worker holds nothing of it afterwards, whatever the router does next."""
    adapter = load_adapter("tiny-llava")
    redis = connect(redis_server.url)
    directory = WorkerDirectory(redis)
    await directory.refresh()
    channels = ChannelPool()
    client = GrpcStageClient(channels) if kind == "grpc" else InProcessStageClient(
        {worker.ctx.address: worker.servicers})
    generate = client.generate

    def never_leaving(address: str, request_id: str):
        stream = generate(address, request_id)
        stream.cancel = lambda: None
        return stream

    client.generate = never_leaving
    stream = RecoveringStream(StagePipeline(directory, MetadataStore(redis), client, RoutePlanner()), adapter)
    try:
        reader = await reading_at_length(stream, adapter, "leaving silently")
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await eventually(lambda: decode_idle(worker), 30, "decode to drop the cancelled request")
    finally:
        if kind == "grpc":
            await client.close()
        await channels.close()
        await redis.aclose()


def decode_idle(worker) -> bool:
    decode = next(s for s in worker.servicers if hasattr(s, "Generate"))
    return decode.in_flight == 0 and not decode.engine.running


async def test_a_stage_cancelling_a_request_fails_its_in_process_call_as_cancelled(worker, monkeypatch):
    """As over gRPC: Cancel ends the encode call held by the stage, and its caller sees CANCELLED."""
    encode = next(s for s in worker.servicers if hasattr(s, "Encode"))
    held, release = threading.Event(), threading.Event()
    original = encode.vision.encode_prepared

    def held_encode(prepared):
        held.set()
        release.wait(60)
        return original(prepared)

    monkeypatch.setattr(encode.vision, "encode_prepared", held_encode)
    client = InProcessStageClient({worker.ctx.address: worker.servicers})
    item = EncodeItem("item-held", -1, 1)
    call = asyncio.create_task(client.encode(worker.ctx.address, "r-held", [(item, png_bytes(32, 32, 7))], ""))
    try:
        await eventually(held.is_set, 30, "the encode batch to start")
        assert await client.cancel("encode", worker.ctx.address, "r-held") is True
        with pytest.raises(StageCallError) as caught:
            await call
        assert caught.value.code == grpc.StatusCode.CANCELLED and caught.value.lost
        assert await client.cancel("encode", worker.ctx.address, "r-held") is False  # no longer held
    finally:
        release.set()


async def test_a_stage_blaming_its_peer_in_metadata_is_attributed_to_the_peer():
    class PrefillLosingItsDecode:
        async def Prefill(self, request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the KV transfer failed",
                                trailing_metadata=failed_peer_metadata("decode", "10.0.0.9:7000"))

    client = InProcessStageClient({"prefill:1": [PrefillLosingItsDecode()]})
    with pytest.raises(StageCallError) as caught:
        await client.prefill("prefill:1", PrefillCall("r1", [1, 2, 3], [], SamplingParams(), "10.0.0.9:7000"))
    assert caught.value.blamed == ("decode", "10.0.0.9:7000") and caught.value.lost
    assert caught.value.http_status == 503 and str(caught.value) == "the KV transfer failed"


def test_failure_metadata_round_trips_and_is_absent_from_other_failures():
    assert failed_peer(failed_peer_metadata("decode", "host:1")) == ("decode", "host:1")
    assert failed_peer([("epd-failed-stage", b"decode"), ("epd-failed-address", b"host:2")]) == ("decode", "host:2")
    assert failed_peer(()) is None and failed_peer(None) is None
    invalid = StageCallError.of(grpc.StatusCode.INVALID_ARGUMENT, "bad image")
    assert (invalid.invalid, invalid.lost, invalid.blamed, invalid.http_status) == (True, False, None, 400)
    assert StageFailure("prefill", "a:1", "x", True).lost == "a:1"


async def test_the_in_process_context_aborts_like_grpc():
    with pytest.raises(StageCallError) as caught:
        await _Context().abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV pool full")
    assert caught.value.http_status == 429 and caught.value.blamed is None


async def test_a_worker_publishes_what_its_peers_must_agree_on(worker, redis_server):
    """The discovery record carries the model, its image-processor fingerprint, the KV block size
    and each stage's batch limit; the router reads the block size from there (no flag of its own)."""
    adapter = load_adapter("tiny-llava")
    redis = connect(redis_server.url)
    try:
        directory = WorkerDirectory(redis, peering=Peering("tiny-llava", adapter.processor_fingerprint))
        workers = await directory.refresh()
        records = {stage: infos[0] for stage, infos in workers.items()}
        assert {s: (r.model, r.processor, r.block_size, r.batch_limit) for s, r in records.items()} == {
            "encode": ("tiny-llava", adapter.processor_fingerprint, 0, 16),
            "prefill": ("tiny-llava", adapter.processor_fingerprint, 16, 8192),
            "decode": ("tiny-llava", adapter.processor_fingerprint, 16, 64)}
        assert directory.block_size() == 16
        prepared = request(adapter, "hello " * 20, [], max_tokens=2, block_size=directory.block_size())
        assert len(prepared.prefix_blocks) == len(prepared.input_ids) // 16 and prepared.block_size == 16
    finally:
        await redis.aclose()
