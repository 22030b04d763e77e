"""The token feed (`DecodeService.Feed`): one call carries the tokens of every
request a router follows on a decode worker, a decode step's tokens in one
message, the same tokens as Generate; a request that leaves drops out of the
batch; a request whose KV never comes fails as its Generate call would have.
Runs a real colocated worker (gRPC over a socket, real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc
from epd.workers.messages import SamplingParams
from epd.workers.router.grpc_stage_client import GrpcStageClient
from epd.workers.router.stage_client import StageCallError
from epd.workers.stages.decode import DecodeServicer
from epd.workers.stages.worker import Worker
from epd.workers.transport.grpc_transport import ChannelPool
from epd.workers.wire import sampling_to_proto

from ..helpers import eventually

pytestmark = pytest.mark.timeout(300)

PROMPTS = {"a": [1, 10, 11, 12], "b": [1, 20, 21, 22, 23, 24, 25], "c": [1, 30], "d": [1, 40, 41, 42, 43]}


def prefill_request(worker: Worker, request_id: str, text_ids: list[int], max_tokens: int) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=request_id, input_ids=text_ids, decode_address=worker.ctx.address,
                             sampling=sampling_to_proto(SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def decoder(worker: Worker) -> DecodeServicer:
    return next(s for s in worker.servicers if isinstance(s, DecodeServicer))


class FeedCall:
    """A raw Feed call: requests sent through a queue, batches read as they come."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.requests: asyncio.Queue[pb.FeedRequest | None] = asyncio.Queue()
        self.call = pb_grpc.DecodeServiceStub(channel).Feed(self._outgoing())

    async def _outgoing(self) -> AsyncIterator[pb.FeedRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    def follow(self, request_id: str) -> None:
        self.requests.put_nowait(pb.FeedRequest(request_id=request_id))

    def leave(self, request_id: str) -> None:
        self.requests.put_nowait(pb.FeedRequest(request_id=request_id, leave=True))

    async def batch(self) -> pb.FeedBatch:
        batch = await asyncio.wait_for(self.call.read(), 60)
        assert isinstance(batch, pb.FeedBatch)
        return batch


async def test_one_feed_carries_every_request_token_exact_a_decode_step_per_message(worker):
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
        prefill, decode = pb_grpc.PrefillServiceStub(channel), pb_grpc.DecodeServiceStub(channel)
        expected = {}
        for name, ids in PROMPTS.items():  # each alone, over Generate
            stream = decode.Generate(pb.GenerateRequest(request_id=f"alone-{name}"), timeout=60)
            await prefill.Prefill(prefill_request(worker, f"alone-{name}", ids, 12), timeout=60)
            expected[name] = [t for chunk in [c async for c in stream] for t in chunk.token_ids]

        feed = FeedCall(channel)
        for name in PROMPTS:
            feed.follow(f"fed-{name}")
        await asyncio.gather(*(prefill.Prefill(prefill_request(worker, f"fed-{name}", ids, 12), timeout=60)
                               for name, ids in PROMPTS.items()))
        chunks: dict[str, list[pb.GenerateChunk]] = {f"fed-{name}": [] for name in PROMPTS}
        widest = 0
        while not all(c and c[-1].finish_reason for c in chunks.values()):
            batch = await feed.batch()
            widest = max(widest, len(batch.chunks))
            for item in batch.chunks:
                assert item.code == 0, item.error
                chunks[item.request_id].append(item.chunk)

        for name, ids in PROMPTS.items():
            got = chunks[f"fed-{name}"]
            assert [c.token_ids[0] for c in got] == expected[name]
            assert [c.completion_tokens for c in got] == list(range(1, 13))
            assert [c.finish_reason for c in got] == [""] * 11 + ["length"]
            assert {c.prompt_tokens for c in got} == {len(ids)}
        assert widest > 1  # requests decoding together come in one message
        # the open feed is not work a drain waits for; only the requests it follows are
        assert worker.calls.active == 0 and decoder(worker).in_flight == 0
        feed.requests.put_nowait(None)
        assert await feed.call.read() is grpc.aio.EOF  # nothing followed: the worker ends the call
        assert await feed.call.code() == grpc.StatusCode.OK


async def test_a_request_that_leaves_drops_out_of_the_batch_and_the_feed_goes_on(worker):
    servicer = decoder(worker)
    async with grpc.aio.insecure_channel(worker.ctx.address) as channel:
        prefill = pb_grpc.PrefillServiceStub(channel)
        feed = FeedCall(channel)
        feed.follow("waiting")  # no KV comes for it
        await eventually(lambda: worker.calls.active == 1, 30, "the feed to follow the waiting request")
        feed.leave("waiting")
        await eventually(lambda: worker.calls.active == 0, 30, "the waiting request to leave")

        feed.follow("long")
        await prefill.Prefill(prefill_request(worker, "long", [1, 10, 11], 3000), timeout=60)
        first = await feed.batch()
        assert [item.request_id for item in first.chunks][0] == "long"
        feed.leave("long")
        await eventually(lambda: servicer.in_flight == 0 and not servicer.engine.running and worker.calls.active == 0,
                         30, "decode to drop the request that left")

        feed.follow("after")
        await prefill.Prefill(prefill_request(worker, "after", [1, 10, 11], 3), timeout=60)
        got = []
        while not (got and got[-1].finish_reason):
            got += [item.chunk for item in (await feed.batch()).chunks if item.request_id == "after"]
        assert [c.completion_tokens for c in got] == [1, 2, 3]
        assert servicer.engine.allocator.used == 0
        feed.call.cancel()


async def test_a_request_whose_kv_never_comes_fails_as_generate_would(worker, monkeypatch):
    monkeypatch.setattr(decoder(worker), "handoff_wait", 0.2)
    channels = ChannelPool()
    client = GrpcStageClient(channels)
    try:
        stream = client.generate(worker.ctx.address, "ghost")
        with pytest.raises(StageCallError) as caught:
            await stream.read()
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not caught.value.lost
        assert "no KV cache arrived for request ghost" in str(caught.value)
        assert await stream.read() is None and not await stream.ended_lost()
        assert worker.calls.active == 0
    finally:
        await client.close()
        await channels.close()
