"""Faults in the middle of a KV handoff, and back-pressure, against real
workers in this process (gRPC over sockets, real Redis, shared memory). A
"killed" worker is cut off the way a dead process is seen from outside: its
server stops at once (every call it serves fails) and its channels to peers
close (every call it makes breaks), at the exact moment the test picks, which
a SIGKILL to a subprocess could not hit reliably. Afterwards the survivor's
block pool is idle and nothing was left under /dev/shm."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading

import grpc
import pytest
import torch

from epd.image_size import ImageSize
from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc
from epd.workers.messages import ChatMessage, ImagePart, SamplingParams, TextPart
from epd.workers.models import load_adapter
from epd.workers.stages.decode import DecodeServicer
from epd.workers.stages.prefill import PrefillServicer
from epd.workers.stages.worker import Worker, WorkerConfig
from epd.workers.transport.tcp_path import TcpLayerSender
from epd.workers.wire import sampling_to_proto

from ..helpers import eventually, png_bytes

pytestmark = pytest.mark.timeout(300)

PROMPT = [1, *range(10, 90)]  # 81 tokens: 6 blocks of 16


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


async def start(redis_url: str, role: str, paths: str, **extra) -> Worker:
    worker = Worker(WorkerConfig(role=role, model="tiny-llava", redis_url=redis_url, kv_paths=paths,
                                 drain_timeout=0.0, **extra))
    await worker.start()
    return worker


async def kill(worker: Worker) -> None:
    """Cut the worker off as a dead process would be: no more serving, no more calling."""
    await worker.server.stop(0)
    await worker.ctx.channels.close()


def servicer(worker: Worker, kind: type):
    return next(s for s in worker.servicers if isinstance(s, kind))


def prefill_request(request_id: str, decode: Worker, max_tokens: int = 4) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=request_id, input_ids=PROMPT, decode_address=decode.ctx.address,
                             sampling=sampling_to_proto(SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


@pytest.fixture
async def pair(redis_server, request):
    """A prefill and a decode worker that hand KV over `request.param` (shm or grpc)."""
    before = shm_entries()
    prefill = await start(redis_server.url, "prefill", request.param)
    decode = await start(redis_server.url, "decode", request.param)
    yield prefill, decode
    for worker in (prefill, decode):
        await worker.server.stop(0)
        for stage in worker.servicers:
            await stage.stop()
    assert shm_entries() == before  # memfd memory has no name: nothing can leak there


@pytest.mark.parametrize("pair", ["grpc", "shm", "nixl", "tcp"], indirect=True)
async def test_decode_killed_mid_transfer_fails_the_request_and_frees_prefill(pair):
    prefill, decode = pair
    receiver = servicer(decode, DecodeServicer).receiver
    if receiver.shm is not None or receiver.nixl is not None:  # the KV goes straight into decode's memory:
        # die at the commit
        target, name = servicer(decode, DecodeServicer), "_arrive"
    elif receiver.tcp is not None:  # tcp: die as the first frame comes in (its socket closes with it)
        target, name = receiver.tcp, "_receive"
    else:  # grpc: die as the first frame lands
        target, name = receiver, "_write_frame"
    killed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def dying(*args, **kwargs):
        killed.set()
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(kill(decode)))
        raise ConnectionResetError("the decode process is gone")  # it never answers this call
    setattr(target, name, dying)
    async with grpc.aio.insecure_channel(prefill.ctx.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await pb_grpc.PrefillServiceStub(channel).Prefill(prefill_request("r1", decode), timeout=60)
    assert killed.is_set()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and decode.ctx.address in failed.value.details()
    engine = servicer(prefill, PrefillServicer).engine
    await eventually(lambda: engine.allocator.used == 0 and not engine.handing_off)


@pytest.mark.parametrize("pair", ["grpc"], indirect=True)
async def test_prefill_killed_mid_transfer_frees_the_decode_reservation(pair):
    prefill, decode = pair
    decode_servicer = servicer(decode, DecodeServicer)
    receiver = decode_servicer.receiver
    original = receiver._write_frame
    killed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_frame_then_the_sender_dies(*args):
        if not killed.is_set():
            killed.set()
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(kill(prefill)))
        return original(*args)
    receiver._write_frame = first_frame_then_the_sender_dies
    async with grpc.aio.insecure_channel(prefill.ctx.address) as channel:
        call = pb_grpc.PrefillServiceStub(channel).Prefill(prefill_request("r2", decode), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    await eventually(lambda: not receiver.reservations and decode_servicer.engine.allocator.used == 0)


@pytest.mark.parametrize("pair", ["shm"], indirect=True)
async def test_a_request_cancelled_while_prefill_writes_into_decode_keeps_its_blocks_until_prefill_is_done(pair):
    """On shared memory prefill writes into decode's blocks itself. The router cancels the request at decode
    and prefill, then cancels the Prefill call: decode keeps the blocks (a late write must not land in blocks
    given to another sequence) until prefill, its step over, gives them back."""
    prefill, decode = pair
    decode_servicer, prefill_servicer = servicer(decode, DecodeServicer), servicer(prefill, PrefillServicer)
    held, release = threading.Event(), threading.Event()
    step = prefill_servicer.engine.step

    def held_step():
        held.set()
        release.wait(60)
        return step()
    prefill_servicer.engine.step = held_step
    try:
        async with grpc.aio.insecure_channel(prefill.ctx.address) as to_prefill, \
                grpc.aio.insecure_channel(decode.ctx.address) as to_decode:
            call = asyncio.ensure_future(pb_grpc.PrefillServiceStub(to_prefill).Prefill(
                prefill_request("cancelled", decode), timeout=60))
            await eventually(held.is_set, 30, "prefill's step to start")
            reserved = decode_servicer.engine.allocator.used
            assert decode_servicer.receiver.reservations["cancelled"].path == "shm" and reserved > 0
            cancel = pb.CancelRequest(request_id="cancelled")
            assert (await pb_grpc.DecodeServiceStub(to_decode).Cancel(cancel, timeout=10)).cancelled
            assert "cancelled" in decode_servicer.receiver.reservations  # prefill's step may still write
            assert decode_servicer.engine.allocator.used == reserved
            assert (await pb_grpc.PrefillServiceStub(to_prefill).Cancel(cancel, timeout=10)).cancelled
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            release.set()
            await eventually(lambda: not decode_servicer.receiver.reservations
                             and decode_servicer.engine.allocator.used == 0, 30,
                             "prefill to give decode's blocks back (their lease is 60 s)")
            await eventually(lambda: prefill_servicer.engine.allocator.used == 0, 30, "prefill to free its blocks")
    finally:
        release.set()


@pytest.mark.parametrize("pair", ["tcp"], indirect=True)
async def test_prefill_killed_mid_tcp_transfer_frees_the_decode_reservation(pair, monkeypatch):
    prefill, decode = pair
    decode_servicer = servicer(decode, DecodeServicer)
    original = TcpLayerSender._send_layer
    loop = asyncio.get_running_loop()

    def dies_after_the_first_layer(sender, layer, table):
        if layer == 1:  # the process is gone: its socket closes, its calls break
            sender.connection.shutdown(socket.SHUT_RDWR)
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(kill(prefill)))
            raise ConnectionResetError("the prefill process is gone")
        return original(sender, layer, table)
    monkeypatch.setattr(TcpLayerSender, "_send_layer", dies_after_the_first_layer)
    async with grpc.aio.insecure_channel(prefill.ctx.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.PrefillServiceStub(channel).Prefill(prefill_request("r3", decode), timeout=60)
    await eventually(lambda: not decode_servicer.receiver.reservations and decode_servicer.engine.allocator.used == 0)


async def _reserve_tcp(decode: Worker, request_id: str) -> pb.ReserveKVReply:
    spec = pb.ReserveKVRequest(request_id=request_id, prompt_tokens=len(PROMPT), max_tokens=4, sender_host="x",
                               paths=["tcp", "grpc"])
    spec.layout.CopyFrom(_layout(servicer(decode, DecodeServicer)))
    async with grpc.aio.insecure_channel(decode.ctx.address) as channel:
        return await pb_grpc.DecodeServiceStub(channel).ReserveKV(spec, timeout=10)


def _closed_after(port: int, *messages: bytes) -> bool:
    """Send `messages` to decode's tcp listener; True when it closes (or resets) the connection without a
    word."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        try:
            for message in messages:
                connection.sendall(message)
            return connection.recv(8) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


@pytest.mark.parametrize("pair", ["tcp"], indirect=True)
async def test_tcp_writes_need_the_reservations_token_and_stay_inside_its_blocks(pair):
    _, decode = pair
    decode_servicer = servicer(decode, DecodeServicer)
    pool = decode_servicer.engine.pool.kv
    reply = await _reserve_tcp(decode, "t1")
    assert reply.path == "tcp" and reply.tcp_port > 0 and len(reply.tcp_token) == 16
    before = pool.clone()
    wrong = bytes(16) if reply.tcp_token != bytes(16) else b"\x01" * 16
    block_bytes = pool[0, 0, 0].numel() * pool.element_size()
    frame = struct.pack("<HBII", 0, 0, 0, 1) + b"\xff" * block_bytes
    # a wrong token is refused and costs the rightful sender nothing
    assert await asyncio.to_thread(_closed_after, reply.tcp_port, _hello("t1", wrong), frame)
    assert "t1" in decode_servicer.receiver.reservations and torch.equal(pool, before)
    # the right token with a frame beyond the reservation: refused, and the reservation is given up
    outside = struct.pack("<HBII", 0, 0, len(reply.block_ids), 1)
    assert await asyncio.to_thread(_closed_after, reply.tcp_port, _hello("t1", reply.tcp_token), outside)
    await eventually(lambda: not decode_servicer.receiver.reservations and decode_servicer.engine.allocator.used == 0)
    assert torch.equal(pool, before)


def _hello(request_id: str, token: bytes) -> bytes:
    return struct.pack("<4sH16s", b"EPT1", len(request_id), token) + request_id.encode()


@pytest.mark.parametrize("pair", ["shm"], indirect=True)
async def test_a_reservation_whose_sender_died_is_released_by_the_sweep(pair):
    prefill, decode = pair
    decode_servicer = servicer(decode, DecodeServicer)
    spec = pb.ReserveKVRequest(request_id="orphan", prompt_tokens=len(PROMPT), max_tokens=4, sender_host="x",
                               paths=["grpc"])
    spec.layout.CopyFrom(_layout(decode_servicer))
    async with grpc.aio.insecure_channel(decode.ctx.address) as channel:
        reply = await pb_grpc.DecodeServiceStub(channel).ReserveKV(spec, timeout=10)
    assert len(reply.block_ids) == 6 and decode_servicer.engine.allocator.used == 6
    decode_servicer.clock = lambda: 1e12  # its lease has long passed: nobody will commit
    await eventually(lambda: decode_servicer.engine.allocator.used == 0 and not decode_servicer.receiver.reservations,
                within=decode_servicer.handoff_wait)


def _layout(decode_servicer: DecodeServicer):
    from epd.workers.wire import layout_to_proto

    return layout_to_proto(decode_servicer.engine.pool.layout)


@pytest.mark.parametrize("pair", ["shm"], indirect=True)
async def test_a_full_decode_worker_makes_prefill_wait_and_drops_nothing(redis_server, pair):
    prefill, _ = pair
    small = await start(redis_server.url, "decode", "shm", decode_max_batch=1)
    try:
        async with grpc.aio.insecure_channel(prefill.ctx.address) as prefill_channel, \
                grpc.aio.insecure_channel(small.ctx.address) as decode_channel:
            decode_stub, prefill_stub = pb_grpc.DecodeServiceStub(decode_channel), pb_grpc.PrefillServiceStub(
                prefill_channel)

            async def one(index: int) -> list[int]:
                stream = decode_stub.Generate(pb.GenerateRequest(request_id=f"q{index}"), timeout=120)
                await prefill_stub.Prefill(prefill_request(f"q{index}", small, max_tokens=8), timeout=120)
                return [t for chunk in [c async for c in stream] for t in chunk.token_ids]

            outputs = await asyncio.gather(*(one(i) for i in range(4)))
        engine = servicer(small, DecodeServicer).engine
        assert [len(tokens) for tokens in outputs] == [8] * 4
        assert len({tuple(tokens) for tokens in outputs}) == 1  # the same prompt: the same greedy tokens
        assert engine.stats.peak_batch == 1 and engine.allocator.used == 0
    finally:
        await small.server.stop(0)
        for stage in small.servicers:
            await stage.stop()


async def test_encode_killed_while_pushing_is_recomputed_elsewhere(redis_server):
    """The encode worker dies as it pushes an image's embedding to prefill: prefill stops waiting after
    its embedding wait, finds the owner gone and recomputes on the other encode worker; the request
    completes and every pool is idle afterwards."""
    before = shm_entries()
    dying = await start(redis_server.url, "encode", "shm")
    spare = await start(redis_server.url, "encode", "shm")
    prefill = await start(redis_server.url, "prefill", "shm")
    decode = await start(redis_server.url, "decode", "shm")
    stage = servicer(prefill, PrefillServicer)
    stage.embeddings.embedding_wait = 1.0  # how long prefill waits for a push before falling back
    original = dying.ctx.embeddings.push

    async def die_while_pushing(*args, **kwargs):
        await kill(dying)
        raise ConnectionResetError("the encode process is gone")
    dying.ctx.embeddings.push = die_while_pushing
    try:
        await eventually(lambda: len(prefill.ctx.directory.live("encode")) == 2)
        adapter = load_adapter("tiny-llava")
        image = png_bytes(40, 30, seed=5)
        ids = adapter.build_prompt([ChatMessage("user", (ImagePart(0), TextPart("What is it?")))],
                                   [ImageSize(40, 30)])
        item = pb.EncodeItem(item_key="img-1", image=image, tile_index=-1, n_tokens=16, dispatched=True)
        ref = pb.ImageRef(image_key="img-1", image=image, width=40, height=30,
                          items=[pb.EncodeItem(item_key="img-1", tile_index=-1, n_tokens=16, dispatched=True)])
        request = pb.PrefillRequest(request_id="e1", input_ids=ids, images=[ref], decode_address=decode.ctx.address,
                                    sampling=sampling_to_proto(SamplingParams(max_tokens=4, ignore_eos=True)))
        async with grpc.aio.insecure_channel(dying.ctx.address) as encode_channel, \
                grpc.aio.insecure_channel(prefill.ctx.address) as prefill_channel, \
                grpc.aio.insecure_channel(decode.ctx.address) as decode_channel:
            stream = pb_grpc.DecodeServiceStub(decode_channel).Generate(pb.GenerateRequest(request_id="e1"), timeout=60)
            encode = pb_grpc.EncodeServiceStub(encode_channel).Encode(
                pb.EncodeRequest(request_id="e1", items=[item], prefill_address=prefill.ctx.address), timeout=60)
            reply = await pb_grpc.PrefillServiceStub(prefill_channel).Prefill(request, timeout=60)
            tokens = [t for chunk in [c async for c in stream] for t in chunk.token_ids]
            with pytest.raises(grpc.aio.AioRpcError):
                await encode
        assert reply.items.recomputed == 1 and len(tokens) == 4
        await eventually(lambda: stage.engine.allocator.used == 0
                    and servicer(decode, DecodeServicer).engine.allocator.used == 0)
    finally:
        dying.ctx.embeddings.push = original
        for worker in (spare, prefill, decode):
            await worker.server.stop(0)
            for stage_servicer in worker.servicers:
                await stage_servicer.stop()
    assert shm_entries() == before


async def test_recompute_refreshes_discovery_when_every_listed_encoder_fails(redis_server):
    """Prefill's view of the encode workers lists only one that is dead (still registered); an encode
    worker that started since (a restarted pod) is found by refreshing discovery after the first pass
    fails, and the item is recomputed there."""
    dead = await start(redis_server.url, "encode", "shm")
    prefill = await start(redis_server.url, "prefill", "shm")
    decode = await start(redis_server.url, "decode", "shm")
    await eventually(lambda: len(prefill.ctx.directory.live("encode")) == 1)
    await prefill.ctx.directory.stop()  # freeze the view: only a refresh inside recompute sees the new worker
    await kill(dead)
    restarted = await start(redis_server.url, "encode", "shm")
    try:
        adapter = load_adapter("tiny-llava")
        image = png_bytes(40, 30, seed=6)
        ids = adapter.build_prompt([ChatMessage("user", (ImagePart(0), TextPart("What is it?")))],
                                   [ImageSize(40, 30)])
        ref = pb.ImageRef(image_key="img-2", image=image, width=40, height=30,
                          items=[pb.EncodeItem(item_key="img-2", tile_index=-1, n_tokens=16)])
        request = pb.PrefillRequest(request_id="r1", input_ids=ids, images=[ref], decode_address=decode.ctx.address,
                                    sampling=sampling_to_proto(SamplingParams(max_tokens=4, ignore_eos=True)))
        async with grpc.aio.insecure_channel(prefill.ctx.address) as prefill_channel, \
                grpc.aio.insecure_channel(decode.ctx.address) as decode_channel:
            stream = pb_grpc.DecodeServiceStub(decode_channel).Generate(pb.GenerateRequest(request_id="r1"), timeout=60)
            reply = await pb_grpc.PrefillServiceStub(prefill_channel).Prefill(request, timeout=60)
            tokens = [t for chunk in [c async for c in stream] for t in chunk.token_ids]
        assert reply.items.recomputed == 1 and len(tokens) == 4
        assert restarted.ctx.address in [w.address for w in prefill.ctx.directory.live("encode")]
    finally:
        for worker in (dead, prefill, decode, restarted):
            await worker.stop()
