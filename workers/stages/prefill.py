"""Prefill worker: admit a request at once, wait only for the embeddings still
missing (own buffer, else pull from the owner, else recompute on an encode
worker), batch prompts by a token budget, and stream each KV cache to the
decode worker chosen for the request."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..cache import ByteLRU
from ..engine import PrefillEngine
from ..messages import ImageSize, KVHandoff, PrefillJob
from ..wire import sampling_from_proto, tensor_from_proto
from .batching import MicroBatcher
from .context import WorkerContext

log = logging.getLogger(__name__)


@dataclass
class PrefillTask:
    job: PrefillJob
    future: asyncio.Future


@dataclass
class ItemSources:
    """Where a request's embeddings came from (reported back to the router)."""

    buffer: int = 0
    fetched: int = 0
    recomputed: int = 0


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, ctx: WorkerContext, engine: PrefillEngine, cache_bytes: int, token_budget: int,
                 max_wait: float, embedding_wait: float = 30.0) -> None:
        self.ctx = ctx
        self.engine = engine
        self.buffer = ByteLRU(cache_bytes)  # receive buffer + LRU of embeddings
        self.arrived: dict[str, asyncio.Event] = {}
        self.embedding_wait = embedding_wait
        self.batcher: MicroBatcher[PrefillTask] = MicroBatcher("prefill", self._run_batch, token_budget, max_wait,
                                                               fail_batch=_fail_tasks, health=ctx.health,
                                                               cost=lambda task: len(task.job.input_ids))
        self.outstanding_tokens = 0
        self.active_requests = 0

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    # ---- embeddings in ---------------------------------------------------------
    async def PushEmbeddings(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PushAck:
        received = 0
        async for chunk in request_iterator:
            try:
                tensor = self._validated(tensor_from_proto(chunk.embedding))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"embedding {chunk.item_key}: {exc}")
            self._store(chunk.item_key, tensor)
            received += 1
        return pb.PushAck(received=received)

    def _validated(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pushed embedding must be [rows, hidden] floats of this model's width before it may touch a batch."""
        hidden = self.engine.language.hidden_size
        if tensor.dim() != 2 or tensor.shape[1] != hidden or not tensor.is_floating_point():
            raise ValueError(f"expected a floating [rows, {hidden}] tensor, got {tensor.dtype} {tuple(tensor.shape)}")
        return tensor

    def _store(self, key: str, tensor: torch.Tensor) -> None:
        for evicted in self.buffer.put(key, tensor):
            metrics.CACHE_EVENTS.labels("prefill", "evicted").inc()
            self.arrived.pop(evicted, None)
        self.arrived.setdefault(key, asyncio.Event()).set()

    # ---- the request -----------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        start = time.perf_counter()
        tokens = len(request.input_ids)
        self.active_requests += 1
        self.outstanding_tokens += tokens
        metrics.IN_FLIGHT.labels("prefill").inc()
        try:
            sources = ItemSources()
            job = PrefillJob(request_id=request.request_id, input_ids=list(request.input_ids), image_embeddings=[],
                             image_sizes=[ImageSize(ref.width, ref.height) for ref in request.images],
                             sampling=sampling_from_proto(request.sampling),
                             image_keys=[ref.image_key for ref in request.images])
            # An image wholly inside the cached prefix needs no embedding: do not wait for one.
            job.prefix = self.engine.find_prefix(job)
            needed = self.engine.needed_images(job, job.prefix)
            try:
                job.image_embeddings = list(await asyncio.gather(
                    *(self._image_embedding(ref, request.request_id, sources) if need else _nothing()
                      for ref, need in zip(request.images, needed))))
            except LookupError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            future = asyncio.get_running_loop().create_future()
            self.batcher.submit(PrefillTask(job, future))
            try:
                handoff: KVHandoff = await future
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # the batch failed on our side (e.g. out of device memory)
                await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc!r}")
            self.outstanding_tokens -= tokens
            tokens = 0
            metrics.PREFIX_CACHE_TOKENS.labels("hit").inc(handoff.cached_tokens)
            metrics.PREFIX_CACHE_TOKENS.labels("computed").inc(handoff.prompt_tokens - handoff.cached_tokens)
            try:
                await self.ctx.kv.send(request.decode_address, handoff)
            except grpc.aio.AioRpcError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"KV transfer to decode worker {request.decode_address} failed: {exc.details()}")
            metrics.STAGE_LATENCY.labels("prefill").observe(time.perf_counter() - start)
            return pb.PrefillResponse(first_token=handoff.first_token, prompt_tokens=handoff.prompt_tokens,
                                      items_from_buffer=sources.buffer, items_fetched=sources.fetched,
                                      items_recomputed=sources.recomputed, cached_tokens=handoff.cached_tokens)
        finally:
            self.outstanding_tokens -= tokens
            self.active_requests -= 1
            metrics.IN_FLIGHT.labels("prefill").dec()

    async def _image_embedding(self, ref: pb.ImageRef, request_id: str, sources: ItemSources) -> torch.Tensor:
        items = await asyncio.gather(*(self._item(ref, item, request_id, sources) for item in ref.items))
        return self.engine.language.merge_image(ImageSize(ref.width, ref.height), items)

    async def _item(self, ref: pb.ImageRef, item: pb.EncodeItem, request_id: str, sources: ItemSources) -> torch.Tensor:
        tensor = self._buffered(item)
        if tensor is None and item.dispatched:
            await self._wait_for_push(item.item_key, self.embedding_wait)
            tensor = self._buffered(item)
        if tensor is not None:
            sources.buffer += 1
            metrics.CACHE_EVENTS.labels("prefill", "hit").inc()
            return tensor
        tensor = await self._fetch_from_owner(item.item_key)
        if tensor is not None and self._fits(tensor, item):
            sources.fetched += 1
            metrics.CACHE_EVENTS.labels("prefill", "fetched").inc()
            self._store(item.item_key, tensor)
            return tensor
        sources.recomputed += 1
        metrics.CACHE_EVENTS.labels("prefill", "recompute").inc()
        return await self._recompute(ref, item, request_id)

    def _fits(self, tensor: torch.Tensor, item: pb.EncodeItem) -> bool:
        try:
            self._validated(tensor)
        except ValueError:
            return False
        return tensor.shape[0] == item.n_tokens

    def _buffered(self, item: pb.EncodeItem) -> torch.Tensor | None:
        """The buffered embedding of an item if it has the rows the prompt expects (else it is dropped,
        and the item is fetched or recomputed)."""
        tensor = self.buffer.get(item.item_key)
        if tensor is not None and not self._fits(tensor, item):
            log.warning("dropping embedding %s: %s rows, the prompt expects %d", item.item_key,
                        tuple(tensor.shape), item.n_tokens)
            self.buffer.pop(item.item_key)
            self.arrived.pop(item.item_key, None)
            return None
        return tensor

    async def _wait_for_push(self, key: str, timeout: float) -> None:
        event = self.arrived.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _fetch_from_owner(self, key: str) -> torch.Tensor | None:
        record = await self.ctx.metadata.get(key)
        if record is None or record.state != "ready" or record.owner == self.ctx.address:
            return None
        return await self.ctx.embeddings.fetch(record.owner, key)

    async def _recompute(self, ref: pb.ImageRef, item: pb.EncodeItem, request_id: str) -> torch.Tensor:
        """Encode the item again on a live encode worker (the least loaded first; a dead one that
        discovery still lists is skipped), which pushes it back here."""
        workers = self.ctx.directory.live("encode")
        if not workers:
            await self.ctx.directory.refresh()
            workers = self.ctx.directory.live("encode")
        retry = pb.EncodeItem(item_key=item.item_key, image=ref.image, tile_index=item.tile_index,
                              n_tokens=item.n_tokens)
        failures = []
        for worker in sorted(workers, key=lambda w: (w.load.queue + w.load.in_flight, random.random())):
            self.arrived.pop(item.item_key, None)
            stub = pb_grpc.EncodeServiceStub(self.ctx.channels.get(worker.address))
            try:
                await stub.Encode(pb.EncodeRequest(request_id=request_id, items=[retry],
                                                   prefill_address=self.ctx.address), timeout=self.embedding_wait)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(exc.details()) from exc
                failures.append(f"{worker.address}: {exc.code().name}")
                continue
            tensor = self._buffered(item)
            if tensor is not None:
                return tensor
            failures.append(f"{worker.address}: evicted before use")
        raise LookupError(f"embedding {item.item_key} is unavailable and could not be recomputed"
                          + (f" ({'; '.join(failures)})" if failures else ": no encode worker is live"))

    # ---- batched compute ---------------------------------------------------------
    async def _run_batch(self, tasks: list[PrefillTask]) -> None:
        live = [t for t in tasks if not t.future.cancelled()]
        if not live:
            return
        try:
            handoffs = await self.ctx.compute("prefill", self.engine.run, [t.job for t in live])
        except ValueError as exc:
            if len(live) > 1:  # isolate the bad request, run the rest
                for task in live:
                    await self._run_batch([task])
                return
            live[0].future.set_exception(exc)
            return
        for task, handoff in zip(live, handoffs):
            if not task.future.done():
                task.future.set_result(handoff)


def _fail_tasks(tasks: list[PrefillTask], error: Exception) -> None:
    for task in tasks:
        if not task.future.done():
            task.future.set_exception(error)


async def _nothing() -> None:
    return None
