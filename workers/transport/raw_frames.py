"""Bulk bytes over gRPC without protobuf: a stream of raw frames, each a small
binary header and the payload, through a generic method handler whose
(de)serializers pass bytes through. Used for KV blocks across hosts (the
control messages stay protobuf on the stage services)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

SERVICE = "epd.v1.KVData"
WRITE_METHOD = f"/{SERVICE}/Write"
FRAME_BYTES = 4 << 20  # large frames (few Python round trips per layer) that gRPC still moves smoothly
_HEADER = struct.Struct("<4sHHBII")  # magic, request id length, layer, plane, first block, block count
_MAGIC = b"EPK2"


@dataclass(frozen=True)
class FrameHeader:
    request_id: str
    layer: int
    plane: int  # 0: keys, 1: values
    first_block: int  # index into the reservation's block list
    blocks: int


def encode_frame(header: FrameHeader, payload: memoryview) -> bytes:
    """Header and payload in one bytes object: gRPC sends bytes, and this join is the sender's one copy
    (the payload is a view of the pool's blocks)."""
    rid = header.request_id.encode()
    head = _HEADER.pack(_MAGIC, len(rid), header.layer, header.plane, header.first_block, header.blocks)
    return b"".join((head, rid, payload.cast("B")))


def decode_frame(frame: bytes) -> tuple[FrameHeader, memoryview]:
    """The header and a view of the payload (no copy); ValueError for a frame that is not ours."""
    if len(frame) < _HEADER.size:
        raise ValueError(f"KV frame of {len(frame)} bytes is shorter than its header")
    magic, rid_len, layer, plane, first, count = _HEADER.unpack_from(frame)
    if magic != _MAGIC or plane > 1:
        raise ValueError("not a KV frame (bad magic or plane)")
    start = _HEADER.size + rid_len
    request_id = frame[_HEADER.size:start].decode(errors="replace")
    return FrameHeader(request_id, layer, plane, first, count), memoryview(frame)[start:]


def write_handler(consume: Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Awaitable[bytes]]
                  ) -> grpc.GenericRpcHandler:
    """The decode worker's handler of raw KV streams (bytes in, bytes out)."""
    return grpc.method_handlers_generic_handler(SERVICE, {"Write": grpc.stream_unary_rpc_method_handler(consume)})


def write_call(channel: grpc.aio.Channel) -> grpc.aio.StreamUnaryMultiCallable:
    return channel.stream_unary(WRITE_METHOD)
