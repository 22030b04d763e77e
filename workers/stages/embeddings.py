"""Where prefill gets image embeddings: its receive buffer (pushed by encode
workers), else a pull from the owner recorded in Redis, else a recompute on a
live encode worker. Every embedding is checked against the model before it may
touch a batch."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..cache import ByteLRU
from ..messages import ImageSize
from ..models import LanguagePartBase
from ..timeouts import within
from .context import WorkerContext

log = logging.getLogger(__name__)


@dataclass
class ItemSources:
    """Where a request's embeddings came from (reported back to the router)."""

    buffer: int = 0
    fetched: int = 0
    recomputed: int = 0


class EmbeddingSource:
    def __init__(self, ctx: WorkerContext, language: LanguagePartBase, cache_bytes: int,
                 embedding_wait: float = 30.0) -> None:
        self.ctx = ctx
        self.language = language
        self.buffer = ByteLRU(cache_bytes)  # receive buffer + LRU of embeddings
        self.arrived: dict[str, asyncio.Event] = {}
        self.embedding_wait = embedding_wait

    def validated(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pushed embedding must be [rows, hidden] floats of this model's width before it may touch a batch."""
        hidden = self.language.hidden_size
        if tensor.dim() != 2 or tensor.shape[1] != hidden or not tensor.is_floating_point():
            raise ValueError(f"expected a floating [rows, {hidden}] tensor, got {tensor.dtype} {tuple(tensor.shape)}")
        return tensor

    def store(self, key: str, tensor: torch.Tensor) -> None:
        for evicted in self.buffer.put(key, tensor):
            metrics.CACHE_EVENTS.labels("prefill", "evicted").inc()
            self.arrived.pop(evicted, None)
        self.arrived.setdefault(key, asyncio.Event()).set()

    async def image_embedding(self, ref: pb.ImageRef, request_id: str, sources: ItemSources) -> torch.Tensor:
        items = await asyncio.gather(*(self._item(ref, item, request_id, sources) for item in ref.items))
        return self.language.merge_image(ImageSize(ref.width, ref.height), items)

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
            self.store(item.item_key, tensor)
            return tensor
        sources.recomputed += 1
        metrics.CACHE_EVENTS.labels("prefill", "recompute").inc()
        return await self._recompute(ref, item, request_id)

    def _fits(self, tensor: torch.Tensor, item: pb.EncodeItem) -> bool:
        try:
            self.validated(tensor)
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

    async def _wait_for_push(self, key: str, seconds: float) -> None:
        event = self.arrived.setdefault(key, asyncio.Event())
        try:
            await within(event.wait(), seconds)
        except TimeoutError:
            pass

    async def _fetch_from_owner(self, key: str) -> torch.Tensor | None:
        record = await self.ctx.metadata.get(key)
        if record is None or record.owner == self.ctx.address or not record.fetchable_from(self.ctx.directory):
            return None  # fetch only from an encode worker discovery lists, never from an address Redis made up
        return await self.ctx.embeddings.fetch(record.owner, key)

    async def _recompute(self, ref: pb.ImageRef, item: pb.EncodeItem, request_id: str) -> torch.Tensor:
        """Encode the item again on a live encode worker (the least loaded first; a dead one that
        discovery still lists is skipped), which pushes it back here. When every listed worker fails,
        discovery is refreshed once and the workers it newly lists (a restarted pod) are tried."""
        if not ref.image:  # its bytes went to this process's encode stage only (see the router's `_for_prefill`)
            raise LookupError(f"embedding {item.item_key} was not computed by this worker's encode stage, and the "
                              "image's bytes were sent only to that stage")
        retry = pb.EncodeItem(item_key=item.item_key, image=ref.image, tile_index=item.tile_index,
                              n_tokens=item.n_tokens)
        failures: list[str] = []
        tried: set[str] = set()
        for refresh in (False, True):
            if refresh or not self.ctx.directory.live("encode"):
                await self.ctx.directory.refresh()
            untried = [w for w in self.ctx.directory.live("encode") if w.address not in tried]
            for worker in sorted(untried, key=lambda w: (w.load.queue + w.load.in_flight, random.random())):
                tried.add(worker.address)
                tensor = await self._encode_on(worker.address, retry, item, request_id, failures)
                if tensor is not None:
                    return tensor
        raise LookupError(f"embedding {item.item_key} is unavailable and could not be recomputed"
                          + (f" ({'; '.join(failures)})" if failures else ": no encode worker is live"))

    async def _encode_on(self, address: str, retry: pb.EncodeItem, item: pb.EncodeItem, request_id: str,
                         failures: list[str]) -> torch.Tensor | None:
        """The item encoded again by one worker and pushed back here, or None (the reason added to `failures`)."""
        self.arrived.pop(item.item_key, None)
        stub = pb_grpc.EncodeServiceStub(self.ctx.channels.get(address))
        try:
            await stub.Encode(pb.EncodeRequest(request_id=request_id, items=[retry], prefill_address=self.ctx.address),
                              timeout=self.embedding_wait)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details()) from exc
            failures.append(f"{address}: {exc.code().name}")
            return None
        tensor = self._buffered(item)
        if tensor is None:
            failures.append(f"{address}: evicted before use")
        return tensor
