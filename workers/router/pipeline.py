"""One attempt of a request through the stages: encode (only what the cache
lacks, spread over encode workers, not awaited before prefill), prefill, then
the decode stream. Yields decode chunks. A worker failing in a way another
worker may not (gone, shutting down) raises `StageFailure`; bad input raises
`APIError`. Whenever the attempt ends before its last token (the client left,
or a stage failed) the stages still holding the request get a `Cancel`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace

from .. import metrics
from ..cache import MetadataStore
from ..messages import EncodeItem, GeneratedChunk, ImageRef, PrefillCall
from ..registry import WorkerDirectory
from .errors import APIError
from .prepare import PreparedRequest
from .routing import RoutePlan, RoutePlanner
from .stage_client import DecodeStream, StageCallError, StageClient

log = logging.getLogger(__name__)


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
    """Runs attempts through the stages with `stages` (gRPC to real workers, or in-process servicers)."""

    def __init__(self, directory: WorkerDirectory, metadata: MetadataStore, stages: StageClient,
                 planner: RoutePlanner) -> None:
        self.directory = directory
        self.metadata = metadata
        self.stages = stages
        self.planner = planner

    async def attempt(self, request: PreparedRequest) -> AsyncGenerator[GeneratedChunk, None]:
        to_encode, images = await self._dispatch_plan(request)
        plan = self.planner.plan(self.directory.workers, len(request.input_ids), list(to_encode),
                                 request.prefix_blocks, request.block_size)
        holders = _Holders(plan)
        generate: DecodeStream | None = None
        finished = False
        try:
            holders.encodes = {address: asyncio.create_task(
                self._encode(address, request, [to_encode[k] for k in keys], plan))
                for address, keys in plan.encode.items()}
            generate = self.stages.generate(plan.decode.address, request.stage_request_id)
            holders.prefill = asyncio.create_task(self._prefill(request, _for_prefill(images, plan), plan))
            await self._first_failure(holders.prefill, list(holders.encodes.values()))
            async for chunk in _read_until_told(generate):
                # set before the yield: a reader that stops at the last chunk closes this generator at the
                # yield, and a finished request must not cost the stages a Cancel
                finished = bool(chunk.finish_reason)
                yield chunk
                if finished:
                    return
            raise StageFailure("decode", plan.decode.address, "the token stream ended before the last token", True)
        except StageCallError as error:
            failure = _failure("decode", plan.decode.address, error)
            holders.lost = failure.lost
            raise failure from error
        except StageFailure as failure:
            if failure.stage == "prefill" and failure.retryable and generate is not None \
                    and await generate.ended_lost():
                failure.stage, failure.address = "decode", plan.decode.address  # prefill failed: decode is gone
            holders.lost = failure.lost
            raise
        finally:
            try:
                if not finished:
                    await asyncio.shield(self._cancel(request.stage_request_id, holders.addresses()))
            finally:  # also when the handler is cancelled again meanwhile (a failed write, then a disconnect)
                for task in [*holders.encodes.values(), *([holders.prefill] if holders.prefill else [])]:
                    task.cancel()
                    task.add_done_callback(_retrieve)  # a call failing after the attempt ended is no news
                if generate is not None:
                    generate.cancel()
                self.planner.release(plan, len(request.input_ids))

    async def _cancel(self, request_id: str, held: list[tuple[str, str]]) -> None:
        """Tell every stage that may hold the request to drop it; bounded, never raises."""

        async def one(stage: str, address: str) -> None:
            try:
                cancelled = await self.stages.cancel(stage, address, request_id)
            except StageCallError as error:
                log.debug("cancel of %s at %s %s: %s", request_id, stage, address, error.code.name)
                return
            if cancelled:
                metrics.ROUTER_CANCELS.labels(stage).inc()

        await asyncio.gather(*(one(stage, address) for stage, address in held))

    async def _dispatch_plan(self, request: PreparedRequest) -> tuple[dict[str, tuple[EncodeItem, bytes]],
                                                                      list[ImageRef]]:
        """Items to encode now (cache misses, with their image's bytes), and the ImageRefs with each
        item marked dispatched or not."""
        keys = [item.item_key for ref in request.images for item in ref.items]
        records = await self.metadata.get_many(sorted(set(keys))) if keys and self.directory.redis_ok else {}
        to_encode: dict[str, tuple[EncodeItem, bytes]] = {}
        images = []
        for ref in request.images:
            items = []
            for item in ref.items:
                record = records.get(item.item_key)
                dispatched = not (record is not None and record.fetchable_from(self.directory))
                if dispatched and item.item_key not in to_encode:
                    to_encode[item.item_key] = (item, ref.image)
                items.append(replace(item, dispatched=dispatched))
            images.append(replace(ref, items=tuple(items)))
        return to_encode, images

    async def _encode(self, address: str, request: PreparedRequest, items: list[tuple[EncodeItem, bytes]],
                      plan: RoutePlan) -> None:
        """Encode on `address`; if that worker is gone, once more on another live one (prefill is
        waiting for these pushes, and would otherwise only recompute after its timeout)."""
        for attempt in range(2):
            try:
                await self.stages.encode(address, request.stage_request_id, items, plan.prefill.address)
                return
            except StageCallError as error:
                if error.invalid:
                    raise APIError(400, f"encode worker {address}: {error}", "invalid_image") from error
                log.warning("encode on %s failed (%s)", address, error.code.name)
                self.planner.suspect(address)
                others = [w.address for w in self.directory.live("encode")
                          if w.address != address and not self.planner.suspected(w)]
                if attempt or not others:
                    return  # prefill falls back to fetching or recomputing the items itself
                address = others[0]

    async def _prefill(self, request: PreparedRequest, images: list[ImageRef], plan: RoutePlan) -> None:
        call = PrefillCall(request.stage_request_id, request.input_ids, images, request.sampling,
                           plan.decode.address)
        try:
            request.cached_tokens = await self.stages.prefill(plan.prefill.address, call)
        except StageCallError as error:
            if error.invalid:
                raise APIError(400, f"prefill worker {plan.prefill.address}: {error}", "prefill_failed") from error
            failure = _failure("prefill", plan.prefill.address, error)
            if failure.retryable and error.blamed is not None:  # prefill lost a peer (its decode worker)
                failure.stage, failure.address = error.blamed
            raise failure from error

    @staticmethod
    async def _first_failure(prefill: asyncio.Task, encodes: list[asyncio.Task]) -> None:
        """Wait for prefill; an encode failure (bad image) aborts it at once."""
        pending = {prefill, *encodes}
        while prefill in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    prefill.cancel()
                    raise error


def _for_prefill(images: list[ImageRef], plan: RoutePlan) -> list[ImageRef]:
    """The images as the Prefill call carries them. One whose every item the prefill worker's own process
    encodes (a colocated worker) goes without its bytes: the Encode call brings them to that process, and
    sending them twice cost a 4-image request ~1.4 MB more through gRPC on its way to the first token."""
    local = set(plan.encode.get(plan.prefill.address, ()))
    return [replace(ref, image=b"") if all(item.dispatched and item.item_key in local for item in ref.items) else ref
            for ref in images]


def _failure(stage: str, address: str, error: StageCallError) -> StageFailure:
    return StageFailure(stage, address, error.detail, error.lost, error.http_status)


async def _read_until_told(stream: DecodeStream) -> AsyncIterator[GeneratedChunk]:
    """The stream's chunks. Cancelling the reader (the client left) leaves the call open, so the
    decode worker learns of it from a `Cancel` while it still holds the request; the call is
    cancelled after that."""
    while True:
        read = asyncio.ensure_future(stream.read())
        try:
            chunk = await asyncio.shield(read)
        except asyncio.CancelledError:
            read.add_done_callback(_retrieve)  # nobody reads it now
            raise
        if chunk is None:
            return
        yield chunk


def _retrieve(done: asyncio.Future) -> None:
    """Mark a future's outcome as seen (asyncio would log an exception nobody retrieved)."""
    if not done.cancelled():
        done.exception()
