"""The stage client that calls stage servicers in this process: the same
servicer methods a gRPC server runs, the same protobuf conversion (the
servicers speak it), no sockets. For tests of the pipeline and the servicers;
`InProcessStageClient({address: worker.servicers, ...})`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from epd.v1 import stages_pb2 as pb

from ..messages import EncodeItem, GeneratedChunk, PrefillCall
from ..timeouts import within
from ..wire import chunk_from_proto, encode_item_to_proto, prefill_to_proto
from .stage_client import StageCallError

T = TypeVar("T")
MAIN_METHOD = {"encode": "Encode", "prefill": "Prefill", "decode": "Generate"}  # tells a stage's servicer


class _Context:
    """The part of grpc.aio.ServicerContext the servicers use: `abort` ends the call with a status."""

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str]] = ()) -> None:
        raise StageCallError.of(code, details, trailing_metadata)


def _status(exc: Exception) -> StageCallError:
    """What a gRPC client would see of an exception in a handler."""
    if isinstance(exc, StageCallError):
        return exc
    if isinstance(exc, TimeoutError):
        return StageCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    return StageCallError(grpc.StatusCode.UNKNOWN, f"Unexpected {exc!r}")


async def _called(call: Awaitable[T]) -> T:
    """Run one call in a task of its own (give it its deadline with `within`), as a server would:
    a stage's Cancel cancels that task, and the caller sees CANCELLED (as a gRPC client does), not its
    own cancellation."""
    task = asyncio.ensure_future(call)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and not (current and current.cancelling()):
            raise StageCallError(grpc.StatusCode.CANCELLED, "the stage cancelled the request") from None
        raise
    except Exception as exc:
        raise _status(exc) from exc


class InProcessDecodeStream:
    """Generate pumped into a queue from its own task, started at once (as a gRPC call is)."""

    def __init__(self, chunks: AsyncIterator[pb.GenerateChunk], deadline: float) -> None:
        self._queue: asyncio.Queue[GeneratedChunk | StageCallError | None] = asyncio.Queue()
        self._failure: StageCallError | None = None
        self._task = asyncio.ensure_future(self._pump(chunks, deadline))

    async def _pump(self, chunks: AsyncIterator[pb.GenerateChunk], deadline: float) -> None:
        try:
            async with asyncio.timeout(deadline):
                async for message in chunks:
                    self._queue.put_nowait(chunk_from_proto(message))
        except Exception as exc:
            self._failure = _status(exc)
            self._queue.put_nowait(self._failure)
            return
        self._queue.put_nowait(None)

    async def read(self) -> GeneratedChunk | None:
        item = await self._queue.get()
        if isinstance(item, StageCallError):
            raise item
        return item

    async def ended_lost(self) -> bool:
        if not self._task.done():
            return False
        return self._task.cancelled() or (self._failure is not None and self._failure.lost)

    def cancel(self) -> None:
        self._task.cancel()


class InProcessStageClient:
    def __init__(self, servicers: Mapping[str, Sequence[Any]], timeout: float = 300.0,
                 cancel_timeout: float = 2.0) -> None:
        self.servicers = servicers  # address -> the servicers a worker there runs
        self.timeout = timeout
        self.cancel_timeout = cancel_timeout

    def _servicer(self, stage: str, address: str) -> Any:
        found = [s for s in self.servicers.get(address, ()) if hasattr(s, MAIN_METHOD[stage])]
        if not found:
            raise StageCallError(grpc.StatusCode.UNAVAILABLE, f"no {stage} servicer at {address}")
        return found[0]

    async def encode(self, address: str, request_id: str, items: Sequence[tuple[EncodeItem, bytes]],
                     prefill_address: str) -> None:
        message = pb.EncodeRequest(request_id=request_id, prefill_address=prefill_address,
                                   items=[encode_item_to_proto(item, image) for item, image in items])
        await _called(within(self._servicer("encode", address).Encode(message, _Context()), self.timeout))

    async def prefill(self, address: str, call: PrefillCall) -> int:
        servicer = self._servicer("prefill", address)
        reply = await _called(within(servicer.Prefill(prefill_to_proto(call), _Context()), self.timeout))
        return reply.cached_tokens

    def generate(self, address: str, request_id: str) -> InProcessDecodeStream:
        servicer = self._servicer("decode", address)
        return InProcessDecodeStream(servicer.Generate(pb.GenerateRequest(request_id=request_id), _Context()),
                                     self.timeout)

    async def cancel(self, stage: str, address: str, request_id: str) -> bool:
        servicer = self._servicer(stage, address)
        request = pb.CancelRequest(request_id=request_id)
        reply = await _called(within(servicer.Cancel(request, _Context()), self.cancel_timeout))
        return reply.cancelled
