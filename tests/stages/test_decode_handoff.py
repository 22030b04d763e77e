"""The decode worker's side of the KV handoff, driven through the servicer's
RPC methods (tiny-llava's real engine, no server): reservations with
back-pressure, refusals of KV that does not fit this worker or model, raw
frames checked against their reservation, and nothing held forever when the
sender or the Generate call goes away."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from epd.v1 import stages_pb2 as pb
from epd.workers.engine import DecodeEngine, KVCacheConfig, build_runtime
from epd.workers.messages import SamplingParams
from epd.workers.models import load_adapter
from epd.workers.stages.decode import DecodeServicer
from epd.workers.transport.kv_paths import host_id
from epd.workers.transport.raw_frames import FrameHeader, encode_frame
from epd.workers.transport.shm import SharedPool
from epd.workers.wire import layout_to_proto, sampling_to_proto

from ..helpers import eventually


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    """The servicer only calls abort(); a real ServicerContext needs a live server."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def decode_servicer(shared: SharedPool | None = None) -> DecodeServicer:
    """tiny-llava (2 layers, 2 KV heads of 16) with 4-token blocks, at most 2 sequences and 64 tokens; its pool
    in `shared` memory if given."""
    adapter = load_adapter("tiny-llava")
    runtime = build_runtime(adapter.load_language(), KVCacheConfig(capacity_bytes=1 << 20, block_size=4,
                                                                   prefix_cache_bytes=0),
                            shared.allocate if shared else None)
    engine = DecodeEngine(runtime.decoder, adapter, runtime.allocator, max_batch=2, max_kv_tokens=64)
    return DecodeServicer(ctx=None, engine=engine, handoff_wait=0.2, shared_fd=shared.fd if shared else None)


@pytest.fixture
def servicer() -> DecodeServicer:
    return decode_servicer()


@pytest.fixture
async def shared_servicer():
    """The same, its pool in shared memory: a sender on this host writes its KV straight into it."""
    servicer = decode_servicer(SharedPool())
    await servicer.receiver.start()
    yield servicer
    await servicer.receiver.stop()


def reserve_request(servicer: DecodeServicer, request_id: str, prompt: int = 7, max_tokens: int = 4,
                    **layout_changes) -> pb.ReserveKVRequest:
    layout = layout_to_proto(servicer.engine.pool.layout)
    for name, value in layout_changes.items():
        setattr(layout, name, value)
    return pb.ReserveKVRequest(request_id=request_id, prompt_tokens=prompt, max_tokens=max_tokens,
                               sender_host="elsewhere", paths=["grpc"], layout=layout)


def commit_request(request_id: str, prompt: int = 7, first_token: int = 5) -> pb.CommitKVRequest:
    return pb.CommitKVRequest(request_id=request_id, prompt_tokens=prompt, first_token=first_token,
                              next_position=prompt, sampling=sampling_to_proto(SamplingParams(max_tokens=4)))


async def test_reservations_wait_while_full_then_resume(servicer):
    first = await servicer.ReserveKV(reserve_request(servicer, "a"), FakeContext())
    assert first.path == "grpc" and len(first.block_ids) == 2  # 7 tokens in 4-token blocks
    await servicer.ReserveKV(reserve_request(servicer, "b"), FakeContext())
    waiting = asyncio.ensure_future(servicer.ReserveKV(reserve_request(servicer, "c"), FakeContext()))
    for _ in range(10):
        await asyncio.sleep(0)  # let it run up to its wait for capacity
    assert not waiting.done() and "c" not in servicer.receiver.reservations
    assert (await servicer.ReleaseKV(pb.ReleaseKVRequest(request_id="a"), FakeContext())).released
    third = await asyncio.wait_for(waiting, 5)
    assert sorted(third.block_ids) == sorted(first.block_ids)  # a's blocks, given back and granted again


async def test_blocks_granted_to_a_sender_that_left_meanwhile_are_given_back(servicer):
    """The sender's ReserveKV is cancelled while the compute thread grants its blocks: they return to the
    pool instead of staying held by a reservation nobody knows of."""
    granting, grant, granted = threading.Event(), threading.Event(), threading.Event()

    def granted_when_told(fn, *args):
        granting.set()
        grant.wait(30)
        try:
            return fn(*args)
        finally:
            granted.set()

    async def on_a_thread(fn, *args):
        return await asyncio.to_thread(granted_when_told, fn, *args)
    servicer.receiver.compute = on_a_thread
    call = asyncio.ensure_future(servicer.ReserveKV(reserve_request(servicer, "left"), FakeContext()))
    try:
        await eventually(granting.is_set, 10, "the compute thread to start granting")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        grant.set()
        await eventually(granted.is_set, 10, "the blocks to be granted")
        await eventually(lambda: servicer.engine.allocator.used == 0 and not servicer.engine.reserved, 10,
                         "the granted blocks to be given back")
        assert servicer.receiver.reservations == {}
    finally:
        grant.set()


async def test_a_reservation_the_worker_cannot_grant_in_time_is_refused(servicer):
    await servicer.ReserveKV(reserve_request(servicer, "a"), FakeContext())
    await servicer.ReserveKV(reserve_request(servicer, "b"), FakeContext())
    servicer.receiver.lease = 60.0  # a and b stay: the worker stays full for the whole wait
    with pytest.raises(Aborted) as full:
        await servicer.ReserveKV(reserve_request(servicer, "c"), FakeContext())
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "stayed full" in str(full.value)


@pytest.mark.parametrize("request_changes, message", [
    (dict(max_tokens=100), "need 27 KV blocks; this decode worker holds at most 16"),
    (dict(num_layers=3), "is not this worker's"),
    (dict(block_size=16), "is not this worker's"),
])
async def test_kv_that_cannot_fit_this_worker_or_model_is_refused(servicer, request_changes, message):
    max_tokens = request_changes.pop("max_tokens", 4)
    with pytest.raises(Aborted) as refused:
        await servicer.ReserveKV(reserve_request(servicer, "r", max_tokens=max_tokens, **request_changes),
                                 FakeContext())
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(refused.value)
    assert servicer.engine.allocator.used == 0 and servicer.receiver.reservations == {}


async def test_commits_are_checked_against_their_reservation(servicer):
    with pytest.raises(Aborted) as unknown:
        await servicer.CommitKV(commit_request("nobody"), FakeContext())
    assert unknown.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await servicer.ReserveKV(reserve_request(servicer, "r"), FakeContext())
    for bad, message in ((commit_request("r", prompt=9), "need 3 blocks, 2 are held"),
                         (commit_request("r", first_token=10**6), "first token 1000000 is not in")):
        with pytest.raises(Aborted) as refused:
            await servicer.CommitKV(bad, FakeContext())
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(refused.value)


async def frames(*items: bytes):
    for item in items:
        yield item


async def test_raw_frames_must_match_their_reservation(servicer):
    await servicer.ReserveKV(reserve_request(servicer, "r"), FakeContext())
    layer_bytes = servicer.engine.pool.layout.bytes_per_block // 4  # one block of one layer's values (2 layers)
    payload = memoryview(torch.ones(layer_bytes, dtype=torch.uint8).numpy())
    cases = [(encode_frame(FrameHeader("nobody", 0, 0, 0, 1), payload), grpc.StatusCode.FAILED_PRECONDITION),
             (encode_frame(FrameHeader("r", 0, 0, 2, 1), payload), grpc.StatusCode.INVALID_ARGUMENT),
             (encode_frame(FrameHeader("r", 5, 0, 0, 1), payload), grpc.StatusCode.INVALID_ARGUMENT),
             (encode_frame(FrameHeader("r", 0, 0, 0, 1), payload[:-4]), grpc.StatusCode.INVALID_ARGUMENT),
             (b"not a frame", grpc.StatusCode.INVALID_ARGUMENT)]
    for frame, code in cases:
        with pytest.raises(Aborted) as refused:
            await servicer.receiver.write_stream(frames(frame), FakeContext())
        assert refused.value.code == code
    assert await servicer.receiver.write_stream(frames(encode_frame(FrameHeader("r", 1, 1, 1, 1), payload)),
                                                FakeContext()) == b"%d" % layer_bytes
    block = servicer.receiver.reservations["r"].blocks[1]
    assert bool((servicer.engine.pool.kv[1, 1, block].flatten().view(torch.uint8) == 1).all())


async def test_a_release_waits_for_the_grpc_frame_being_copied_into_its_blocks(servicer, monkeypatch):
    """The sender goes away (its stream is cancelled) while decode still copies a frame into the reserved
    blocks on a helper thread: the blocks are freed only once that copy is over."""
    await servicer.ReserveKV(reserve_request(servicer, "r"), FakeContext())
    copying, finish = threading.Event(), threading.Event()
    write = servicer.receiver._write_frame

    def slow_write(*args):
        copying.set()
        finish.wait(30)
        return write(*args)
    monkeypatch.setattr(servicer.receiver, "_write_frame", slow_write)
    layer_bytes = servicer.engine.pool.layout.bytes_per_block // 4
    payload = memoryview(torch.ones(layer_bytes, dtype=torch.uint8).numpy())
    stream = asyncio.ensure_future(servicer.receiver.write_stream(
        frames(encode_frame(FrameHeader("r", 0, 0, 0, 1), payload)), FakeContext()))
    try:
        await eventually(copying.is_set, 10, "the frame's copy to start")
        stream.cancel()  # the sender went away: its reservation is released...
        await eventually(lambda: "r" not in servicer.receiver.reservations, 10, "the release to start")
        assert servicer.engine.allocator.used == 2  # ...but not under the copy still running
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await stream
        assert servicer.engine.allocator.used == 0
    finally:
        finish.set()


async def test_kv_whose_generate_gave_up_is_released(servicer):
    with pytest.raises(Aborted) as late:
        async for _ in servicer.Generate(pb.GenerateRequest(request_id="late"), FakeContext()):
            pass
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and servicer.arrival_events == {}
    await servicer.ReserveKV(reserve_request(servicer, "late"), FakeContext())
    await servicer.CommitKV(commit_request("late"), FakeContext())
    assert list(servicer.arrived) == ["late"] and servicer.engine.allocator.used == 2
    servicer.clock = lambda: 1e9  # the handoff wait has long passed when the next commit comes
    await servicer.ReserveKV(reserve_request(servicer, "next"), FakeContext())
    await servicer.CommitKV(commit_request("next"), FakeContext())
    for _ in range(100):
        if "late" not in servicer.arrived:
            break
        await asyncio.sleep(0.01)  # the orphan sweep runs as a task
    assert list(servicer.arrived) == ["next"]
    assert servicer.engine.allocator.used == 2  # only next's blocks


async def test_a_reservation_nobody_commits_expires(servicer):
    await servicer.ReserveKV(reserve_request(servicer, "gone"), FakeContext())
    servicer.clock = lambda: 1e9  # past the lease: the sender died between reserve and commit
    await servicer.receiver.expire()
    assert servicer.receiver.reservations == {} and servicer.engine.allocator.used == 0


async def test_a_cancel_releases_a_reservation_at_once_unless_its_sender_writes_into_it(shared_servicer):
    """Over grpc decode writes the frames itself and can free the blocks at once; over shared memory a
    write may still be on its way, so they stay until the sender commits (refused: the client left), gives
    them back, or its lease ends."""
    servicer = shared_servicer
    cancel = servicer.Cancel

    async def reserve(request_id: str, path: str) -> None:
        spec = reserve_request(servicer, request_id)
        spec.sender_host, spec.paths[:] = host_id(), [path]
        assert (await servicer.ReserveKV(spec, FakeContext())).path == path

    await reserve("over-grpc", "grpc")
    assert (await cancel(pb.CancelRequest(request_id="over-grpc"), FakeContext())).cancelled
    assert servicer.receiver.reservations == {} and servicer.engine.allocator.used == 0

    for request_id in ("commits", "gives-back", "dies"):
        await reserve(request_id, "shm")
        assert (await cancel(pb.CancelRequest(request_id=request_id), FakeContext())).cancelled
        assert request_id in servicer.receiver.reservations and servicer.engine.allocator.used == 2
        if request_id == "commits":
            with pytest.raises(Aborted) as refused:
                await servicer.CommitKV(commit_request(request_id), FakeContext())
            assert refused.value.code == grpc.StatusCode.CANCELLED
            await eventually(lambda: servicer.engine.allocator.used == 0, 10, "the refused KV to be freed")
            assert servicer.arrived == {}
        elif request_id == "gives-back":
            assert (await servicer.ReleaseKV(pb.ReleaseKVRequest(request_id=request_id), FakeContext())).released
        else:
            servicer.clock = lambda: 1e9  # past the lease: the sender died
            await servicer.receiver.expire()
        assert servicer.receiver.reservations == {}
        assert servicer.engine.allocator.used == 0


def test_host_identity_is_stable():
    assert host_id() == host_id() and "/" in host_id()
