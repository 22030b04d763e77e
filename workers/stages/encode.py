"""Encode worker: decode + preprocess images, run the vision tower + projector
over batches of items from many requests, keep results in a byte-bounded LRU,
announce them in Redis, and push them to the prefill worker of each request."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..background import spawn
from ..cache import ByteLRU
from ..cancellation import CancellableRequests
from ..models import EncodeInput, InvalidImageError, VisionPartBase
from ..wire import tensor_to_proto
from .batching import MicroBatcher
from .context import WorkerContext

log = logging.getLogger(__name__)


@dataclass
class EncodeTask:
    key: str
    item: EncodeInput
    future: asyncio.Future


class EncodeServicer(pb_grpc.EncodeServiceServicer, CancellableRequests):
    Cancel = CancellableRequests.Cancel  # the generated base's stub would shadow the mixin's

    def __init__(self, ctx: WorkerContext, vision: VisionPartBase, cache_bytes: int, max_batch: int,
                 max_wait: float) -> None:
        self.ctx = ctx
        self.vision = vision
        self.lru = ByteLRU(cache_bytes)
        self.batcher: MicroBatcher[EncodeTask] = MicroBatcher("encode", self._run_batch, max_batch, max_wait,
                                                              fail_batch=self._fail_batch, health=ctx.health)
        self.in_flight: dict[str, asyncio.Future] = {}  # item key -> embedding being computed
        self.announcing: dict[str, asyncio.Future] = {}  # item key -> its batch's Redis writes, until written
        self.active_requests = 0

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        self.active_requests += 1
        self.track(request.request_id)  # Cancel ends this call; items it queued still finish, for the cache
        metrics.IN_FLIGHT.labels("encode").inc()
        start = time.perf_counter()
        try:
            futures = [asyncio.shield(self._embedding(item)) for item in request.items]
            try:
                tensors = await asyncio.gather(*futures)
            except ValueError as exc:  # InvalidImageError included: the client's image is bad
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # the batch failed on our side (e.g. out of device memory)
                await context.abort(grpc.StatusCode.INTERNAL, f"encode failed: {exc!r}")
            keys = [item.item_key for item in request.items]
            if request.prefill_address:
                await self.ctx.embeddings.push(request.prefill_address, request.request_id, self.ctx.address,
                                               dict(zip(keys, tensors, strict=True)))
            announcing = {self.announcing[key] for key in keys if key in self.announcing}
            if announcing:  # a reply means the embeddings are announced (not cancelled with this call)
                await asyncio.wait(announcing)
            metrics.STAGE_LATENCY.labels("encode").observe(time.perf_counter() - start)
            return pb.EncodeResponse(item_keys=keys)
        finally:
            self.untrack(request.request_id)
            self.active_requests -= 1
            metrics.IN_FLIGHT.labels("encode").dec()

    async def FetchEmbedding(self, request: pb.FetchEmbeddingRequest, context: grpc.aio.ServicerContext) -> pb.Tensor:
        tensor = self.lru.get(request.item_key)
        if tensor is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"embedding {request.item_key} is not held here")
        metrics.CACHE_EVENTS.labels("encode", "served").inc()
        return tensor_to_proto(tensor)

    def _embedding(self, item: pb.EncodeItem) -> asyncio.Future:
        cached = self.lru.get(item.item_key)
        if cached is not None:
            metrics.CACHE_EVENTS.labels("encode", "hit").inc()
            # re-announce: refreshes the TTL, and restores the record if Redis lost it
            spawn(self._announce(item.item_key, cached))
            done = asyncio.get_running_loop().create_future()
            done.set_result(cached)
            return done
        pending = self.in_flight.get(item.item_key)
        if pending is not None:  # the same image in flight for another request: share the work
            return pending
        metrics.CACHE_EVENTS.labels("encode", "miss").inc()
        future = asyncio.get_running_loop().create_future()
        self.in_flight[item.item_key] = future
        spawn(self.ctx.metadata.mark_pending(item.item_key, self.ctx.address))
        self.batcher.submit(EncodeTask(item.item_key, EncodeInput(item.image, item.tile_index), future))
        return future

    async def _run_batch(self, tasks: list[EncodeTask]) -> None:
        # decoding and preprocessing beside the compute thread, on as many helper threads as the worker has
        # cores (PIL and numpy release the GIL), the tower on it
        parts = await asyncio.gather(*(asyncio.to_thread(prepare_isolating_bad, self.vision, share)
                                       for share in split_by_image([t.item for t in tasks], self.ctx.threads)))
        prepared = [result for part in parts for result in part]
        good = [p for p in prepared if not isinstance(p, Exception)]
        features = iter(await self.ctx.compute("encode", self.vision.encode_prepared, good) if good else [])
        results = [p if isinstance(p, Exception) else next(features) for p in prepared]
        metrics.ENCODED_ITEMS.inc(sum(not isinstance(r, Exception) for r in results))
        encoded = []
        for task, result in zip(tasks, results, strict=True):
            self.in_flight.pop(task.key, None)
            if isinstance(result, Exception):
                await self.ctx.metadata.forget(task.key, owner=self.ctx.address)
                if not task.future.done():
                    task.future.set_exception(result)
                continue
            for evicted in self.lru.put(task.key, result):
                metrics.CACHE_EVENTS.labels("encode", "evicted").inc()
                await self.ctx.metadata.forget(evicted, owner=self.ctx.address)
            encoded.append((task, result))
        # the batch's records in one round of Redis writes (an item a later one evicted is forgotten), written
        # while the embeddings are already on their way to prefill
        announced = asyncio.gather(*(self._announce(task.key, result) if task.key in self.lru
                                     else self.ctx.metadata.forget(task.key, owner=self.ctx.address)
                                     for task, result in encoded))
        for task, result in encoded:
            self.announcing[task.key] = announced
            if not task.future.done():
                task.future.set_result(result)
        try:
            await announced
        finally:
            for task, _ in encoded:
                if self.announcing.get(task.key) is announced:
                    del self.announcing[task.key]

    def _fail_batch(self, tasks: list[EncodeTask], error: Exception) -> None:
        for task in tasks:
            self.in_flight.pop(task.key, None)
            spawn(self.ctx.metadata.forget(task.key, owner=self.ctx.address))
            if not task.future.done():
                task.future.set_exception(error)

    async def _announce(self, key: str, tensor) -> None:
        ok = await self.ctx.metadata.mark_ready(key, self.ctx.address, tensor.shape[0], tensor.shape[-1],
                                                str(tensor.dtype).removeprefix("torch."),
                                                tensor.numel() * tensor.element_size())
        if not ok:
            metrics.CACHE_EVENTS.labels("encode", "redis_error").inc()


def split_by_image(items: list[EncodeInput], shares: int) -> list[list[EncodeInput]]:
    """`items` in order, cut into at most `shares` runs of about equal length, never between two items of one
    image (a family that makes all of an image's items at once keeps them for its next item)."""
    shares = max(1, shares)
    parts: list[list[EncodeInput]] = []
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and items[end].image_bytes == items[start].image_bytes:
            end += 1
        # an image goes to the share its middle item falls in
        share = min(shares - 1, (start + end) * shares // (2 * len(items)))
        if len(parts) <= share:
            parts.append([])
        parts[-1].extend(items[start:end])
        start = end
    return parts


def prepare_isolating_bad(vision: VisionPartBase, items: list[EncodeInput]) -> list:
    """Each item prepared for the tower, or (in its slot) the error that makes only it fail."""
    results: list = []
    for item in items:
        try:
            results.append(vision.prepare(item))
        except (InvalidImageError, ValueError) as exc:
            results.append(exc)
    return results
