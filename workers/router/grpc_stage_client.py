"""The stage client for real workers: gRPC calls over the router's channel pool,
internal messages converted at this edge (epd.workers.wire)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from ..messages import EncodeItem, PrefillCall
from ..transport.grpc_transport import ChannelPool
from ..wire import encode_item_to_proto, prefill_to_proto
from .stage_client import StageCallError
from .token_feed import FeedDecodeStream, TokenFeed

STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "encode": pb_grpc.EncodeServiceStub, "prefill": pb_grpc.PrefillServiceStub, "decode": pb_grpc.DecodeServiceStub}


def _error(exc: grpc.aio.AioRpcError) -> StageCallError:
    return StageCallError.of(exc.code(), exc.details() or "", exc.trailing_metadata())


class GrpcStageClient:
    def __init__(self, channels: ChannelPool, timeout: float = 300.0, cancel_timeout: float = 2.0) -> None:
        self.channels = channels
        self.timeout = timeout
        self.cancel_timeout = cancel_timeout
        self.feeds: dict[str, TokenFeed] = {}  # decode address -> the token feed new requests follow
        self._retired: set[TokenFeed] = set()  # replaced feeds, until their last requests end

    async def encode(self, address: str, request_id: str, items: Sequence[tuple[EncodeItem, bytes]],
                     prefill_address: str) -> None:
        message = pb.EncodeRequest(request_id=request_id, prefill_address=prefill_address,
                                   items=[encode_item_to_proto(item, image) for item, image in items])
        try:
            await pb_grpc.EncodeServiceStub(self.channels.get(address)).Encode(message, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def prefill(self, address: str, call: PrefillCall) -> int:
        try:
            reply = await pb_grpc.PrefillServiceStub(self.channels.get(address)).Prefill(prefill_to_proto(call),
                                                                                          timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
        return reply.cached_tokens

    def generate(self, address: str, request_id: str) -> FeedDecodeStream:
        """The request's tokens over the worker's token feed (opened with the first request; opened again
        after it failed, or on the channel that renewed certificates bring)."""
        channel = self.channels.get(address)
        feed = self.feeds.get(address)
        if feed is None or not feed.open or feed.channel is not channel:
            if feed is not None and feed.failure is None:
                feed.retire()
                self._retired.add(feed)
                feed.done.add_done_callback(partial(self._retired_ended, feed))
            feed = self.feeds[address] = TokenFeed(channel)
        return feed.follow(request_id)

    def _retired_ended(self, feed: TokenFeed, _: asyncio.Future) -> None:
        self._retired.discard(feed)

    async def close(self) -> None:
        """End every token feed (before the channels close)."""
        feeds = [*self.feeds.values(), *self._retired]
        self.feeds.clear()
        await asyncio.gather(*(feed.close() for feed in feeds))

    async def cancel(self, stage: str, address: str, request_id: str) -> bool:
        try:
            reply = await STUBS[stage](self.channels.get(address)).Cancel(pb.CancelRequest(request_id=request_id),
                                                                         timeout=self.cancel_timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
        return reply.cancelled
