"""The stage client for real workers: gRPC calls over the router's channel pool,
internal messages converted at this edge (epd.workers.wire)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from ..messages import EncodeItem, GeneratedChunk, PrefillCall
from ..transport.grpc_transport import ChannelPool
from ..wire import chunk_from_proto, encode_item_to_proto, prefill_to_proto
from .stage_client import LOST_CODES, StageCallError

STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "encode": pb_grpc.EncodeServiceStub, "prefill": pb_grpc.PrefillServiceStub, "decode": pb_grpc.DecodeServiceStub}


def _error(exc: grpc.aio.AioRpcError) -> StageCallError:
    return StageCallError.of(exc.code(), exc.details() or "", exc.trailing_metadata())


class GrpcDecodeStream:
    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call

    async def read(self) -> GeneratedChunk | None:
        try:
            message = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, pb.GenerateChunk)
        return chunk_from_proto(message)

    async def ended_lost(self) -> bool:
        return self.call.done() and await self.call.code() in LOST_CODES

    def cancel(self) -> None:
        self.call.cancel()


class GrpcStageClient:
    def __init__(self, channels: ChannelPool, timeout: float = 300.0, cancel_timeout: float = 2.0) -> None:
        self.channels = channels
        self.timeout = timeout
        self.cancel_timeout = cancel_timeout

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

    def generate(self, address: str, request_id: str) -> GrpcDecodeStream:
        stub = pb_grpc.DecodeServiceStub(self.channels.get(address))
        return GrpcDecodeStream(stub.Generate(pb.GenerateRequest(request_id=request_id),
                                              timeout=self.timeout))

    async def cancel(self, stage: str, address: str, request_id: str) -> bool:
        try:
            reply = await STUBS[stage](self.channels.get(address)).Cancel(pb.CancelRequest(request_id=request_id),
                                                                         timeout=self.cancel_timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
        return reply.cancelled
