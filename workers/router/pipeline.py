"""One attempt of a request through the stages: encode (only what the cache
lacks, spread over encode workers, not awaited before prefill), prefill, then
the decode stream. Yields decode chunks. A worker failing in a way another
worker may not (gone, shutting down) raises `StageFailure`; bad input raises
`APIError`. Whenever the attempt ends before its last token (the client left,
or a stage failed) the stages still holding the request get a `Cancel`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..cache import MetadataStore
from ..registry import WorkerDirectory
from ..transport.grpc_transport import ChannelPool
from ..wire import sampling_to_proto
from .errors import APIError
from .prepare import PreparedRequest
from .routing import RoutePlan, RoutePlanner

log = logging.getLogger(__name__)

GRPC_TO_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
# A worker that is gone or shutting down fails this way; another worker may well succeed.
WORKER_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}


@dataclass
class StageFailure(Exception):
    """A stage call failed; `retryable` when the worker was lost rather than the request bad."""

    stage: str
    address: str
    detail: str
    retryable: bool
    status: int = 503

    def __str__(self) -> str:
        return f"{self.stage} worker {self.address}: {self.detail}"

    @property
    def lost(self) -> str:
        """The worker to avoid (and not to send a Cancel to), if it was lost."""
        return self.address if self.retryable else ""

    def api_error(self) -> APIError:
        return APIError(self.status, str(self), f"{self.stage}_failed")


@dataclass
class _Holders:
    """Which stages may still hold the attempt (they get a Cancel if it ends early)."""

    plan: RoutePlan
    encodes: dict[str, asyncio.Task] = field(default_factory=dict)
    prefill: asyncio.Task | None = None
    lost: str = ""  # a worker that failed: no Cancel for it

    def addresses(self) -> list[tuple[str, str]]:
        held = [("encode", a) for a, task in self.encodes.items() if not task.done()]
        if self.prefill is not None and not self.prefill.done():
            held.append(("prefill", self.plan.prefill.address))
        held.append(("decode", self.plan.decode.address))
        return [(stage, address) for stage, address in held if address != self.lost]


class StagePipeline:
    def __init__(self, directory: WorkerDirectory, metadata: MetadataStore, channels: ChannelPool,
                 planner: RoutePlanner, timeout: float = 300.0, cancel_timeout: float = 2.0) -> None:
        self.directory = directory
        self.metadata = metadata
        self.channels = channels
        self.planner = planner
        self.timeout = timeout
        self.cancel_timeout = cancel_timeout

    async def attempt(self, request: PreparedRequest) -> AsyncIterator[pb.GenerateChunk]:
        to_encode, images = await self._dispatch_plan(request)
        plan = self.planner.plan(self.directory.workers, len(request.input_ids), list(to_encode),
                                 request.prefix_blocks)
        holders = _Holders(plan)
        generate = None
        finished = False
        try:
            holders.encodes = {address: asyncio.create_task(
                self._encode(address, request, [to_encode[k] for k in keys], plan))
                for address, keys in plan.encode.items()}
            decode_stub = pb_grpc.DecodeServiceStub(self.channels.get(plan.decode.address))
            generate = decode_stub.Generate(pb.GenerateRequest(request_id=request.stage_request_id),
                                            timeout=self.timeout)
            holders.prefill = asyncio.create_task(self._prefill(request, images, plan))
            await self._first_failure(holders.prefill, list(holders.encodes.values()))
            async for chunk in _read_until_told(generate):
                yield chunk
                if chunk.finish_reason:
                    finished = True
                    return
            raise StageFailure("decode", plan.decode.address, "the token stream ended before the last token", True)
        except grpc.aio.AioRpcError as exc:
            failure = _failure("decode", plan.decode.address, exc)
            holders.lost = failure.lost
            raise failure from exc
        except StageFailure as failure:
            if failure.stage == "prefill" and failure.retryable and generate is not None and generate.done() \
                    and await generate.code() in WORKER_LOST:
                failure.stage, failure.address = "decode", plan.decode.address  # prefill failed: decode is gone
            holders.lost = failure.lost
            raise
        finally:
            if not finished:
                await asyncio.shield(self._cancel(request.stage_request_id, holders.addresses()))
            for task in [*holders.encodes.values(), *([holders.prefill] if holders.prefill else [])]:
                task.cancel()
                task.add_done_callback(_retrieve)  # a call failing after the attempt ended is no news
            if generate is not None:
                generate.cancel()
            self.planner.release(plan, len(request.input_ids))

    async def _cancel(self, request_id: str, held: list[tuple[str, str]]) -> None:
        """Tell every stage that may hold the request to drop it; bounded, never raises."""
        stubs = {"encode": pb_grpc.EncodeServiceStub, "prefill": pb_grpc.PrefillServiceStub,
                 "decode": pb_grpc.DecodeServiceStub}

        async def one(stage: str, address: str) -> None:
            try:
                reply = await stubs[stage](self.channels.get(address)).Cancel(
                    pb.CancelRequest(request_id=request_id), timeout=self.cancel_timeout)
            except grpc.aio.AioRpcError as exc:
                log.debug("cancel of %s at %s %s: %s", request_id, stage, address, exc.code().name)
                return
            if reply.cancelled:
                metrics.ROUTER_CANCELS.labels(stage).inc()

        await asyncio.gather(*(one(stage, address) for stage, address in held))

    async def _dispatch_plan(self, request: PreparedRequest) -> tuple[dict[str, pb.EncodeItem], list[pb.ImageRef]]:
        """Items to encode now (cache misses), and the ImageRefs marked accordingly."""
        keys = [item.item_key for ref in request.images for item in ref.items]
        records = await self.metadata.get_many(sorted(set(keys))) if keys and self.directory.redis_ok else {}
        to_encode: dict[str, pb.EncodeItem] = {}
        images = []
        for ref in request.images:
            items = []
            for item in ref.items:
                record = records.get(item.item_key)
                cached = record is not None and record.fetchable_from(self.directory)
                dispatched = not cached
                if dispatched and item.item_key not in to_encode:
                    to_encode[item.item_key] = pb.EncodeItem(item_key=item.item_key, image=ref.image,
                                                             tile_index=item.tile_index, n_tokens=item.n_tokens)
                items.append(pb.EncodeItem(item_key=item.item_key, tile_index=item.tile_index,
                                           n_tokens=item.n_tokens, dispatched=dispatched))
            images.append(pb.ImageRef(image_key=ref.image_key, image=ref.image, items=items, width=ref.width,
                                      height=ref.height))
        return to_encode, images

    async def _encode(self, address: str, request: PreparedRequest, items: list[pb.EncodeItem], plan: RoutePlan) -> None:
        """Encode on `address`; if that worker is gone, once more on another live one (prefill is
        waiting for these pushes, and would otherwise only recompute after its timeout)."""
        for attempt in range(2):
            stub = pb_grpc.EncodeServiceStub(self.channels.get(address))
            try:
                await stub.Encode(pb.EncodeRequest(request_id=request.stage_request_id, items=items,
                                                   prefill_address=plan.prefill.address), timeout=self.timeout)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise APIError(400, f"encode worker {address}: {exc.details()}", "invalid_image") from exc
                log.warning("encode on %s failed (%s)", address, exc.code().name)
                self.planner.suspect(address)
                others = [w.address for w in self.directory.live("encode")
                          if w.address != address and w.address not in self.planner.suspects]
                if attempt or not others:
                    return  # prefill falls back to fetching or recomputing the items itself
                address = others[0]

    async def _prefill(self, request: PreparedRequest, images: list[pb.ImageRef], plan: RoutePlan) -> None:
        stub = pb_grpc.PrefillServiceStub(self.channels.get(plan.prefill.address))
        message = pb.PrefillRequest(request_id=request.stage_request_id, input_ids=request.input_ids,
                                    images=images, sampling=sampling_to_proto(request.sampling),
                                    decode_address=plan.decode.address)
        try:
            reply = await stub.Prefill(message, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            # prefill itself, or the decode worker it streams the KV cache to, may be the one lost
            lost = plan.decode.address if plan.decode.address in (exc.details() or "") else plan.prefill.address
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise APIError(400, f"prefill worker {plan.prefill.address}: {exc.details()}",
                               "prefill_failed") from exc
            failure = _failure("prefill", plan.prefill.address, exc)
            if failure.retryable and lost != plan.prefill.address:
                failure.stage, failure.address = "decode", lost
            raise failure from exc
        request.cached_tokens = reply.cached_tokens

    @staticmethod
    async def _first_failure(prefill: asyncio.Task, encodes: list[asyncio.Task]) -> None:
        """Wait for prefill; an encode failure (bad image) aborts it at once."""
        pending = {prefill, *encodes}
        while prefill in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    prefill.cancel()
                    raise task.exception()


def _failure(stage: str, address: str, exc: grpc.aio.AioRpcError) -> StageFailure:
    code = exc.code()
    retryable = code in WORKER_LOST
    return StageFailure(stage, address, exc.details() or code.name, retryable,
                        GRPC_TO_HTTP.get(code, 503 if retryable else 500))


async def _read_until_told(call) -> AsyncIterator[pb.GenerateChunk]:
    """The stream's messages. Cancelling the reader (the client left) leaves the call open, so the
    decode worker learns of it from a `Cancel` while it still holds the request; the call is
    cancelled after that."""
    while True:
        read = asyncio.ensure_future(call.read())
        try:
            chunk = await asyncio.shield(read)
        except asyncio.CancelledError:
            read.add_done_callback(_retrieve)  # nobody reads it now
            raise
        if chunk is grpc.aio.EOF:
            return
        yield chunk


def _retrieve(done: asyncio.Future) -> None:
    """Mark a future's outcome as seen (asyncio would log an exception nobody retrieved)."""
    if not done.cancelled():
        done.exception()
