"""One request through the stages: encode (only what the cache lacks, spread
over encode workers, not awaited before prefill), prefill, then the decode
stream. Yields decode chunks; raises APIError with the right status."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from ..cache import MetadataStore, block_hashes, image_key, item_key
from ..models import ModelAdapter
from ..registry import WorkerDirectory
from ..transport import ChannelPool
from ..wire import sampling_to_proto
from .errors import APIError
from .images import FetchedImage
from .routing import RoutePlan, RoutePlanner
from .schema import ChatRequest

log = logging.getLogger(__name__)

GRPC_TO_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504}


@dataclass
class PreparedRequest:
    request_id: str
    input_ids: list[int]
    images: list[pb.ImageRef]
    chat: ChatRequest
    max_tokens: int
    prefix_blocks: list[str] = field(default_factory=list)  # chained block hashes (prefix-affinity routing)
    cached_tokens: int = 0  # prompt tokens prefill took from its prefix KV cache (usage reports them)


def prepare(adapter: ModelAdapter, chat: ChatRequest, images: list[FetchedImage], default_max_tokens: int,
            prefix_block_size: int = 16) -> PreparedRequest:
    """Prompt ids with image placeholders expanded, and one ImageRef per image."""
    ids = adapter.build_prompt(list(chat.messages), [image.size for image in images])
    room = adapter.max_context - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt is {len(ids)} tokens (images included), longer than the model's context "
                            f"of {adapter.max_context} tokens", "context_length_exceeded", "messages")
    max_tokens = chat.max_tokens if chat.max_tokens is not None else min(default_max_tokens, room)
    if len(ids) + max_tokens > adapter.max_context:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                            f"of {adapter.max_context} tokens", "context_length_exceeded", "max_tokens")
    refs = []
    for image in images:
        key = image_key(adapter.model_id, adapter.processor_fingerprint, image.data)
        counts = adapter.image_items(image.size)
        tiles = [-1] if len(counts) == 1 else list(range(len(counts)))
        items = [pb.EncodeItem(item_key=item_key(key, tile), tile_index=tile, n_tokens=n)
                 for tile, n in zip(tiles, counts)]
        refs.append(pb.ImageRef(image_key=key, image=image.data, items=items, width=image.size.width,
                                height=image.size.height))
    blocks = block_hashes(ids, adapter.image_token_id, [ref.image_key for ref in refs],
                          [adapter.image_tokens(image.size) for image in images], prefix_block_size)
    return PreparedRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, refs, chat, max_tokens, blocks)


class StagePipeline:
    def __init__(self, directory: WorkerDirectory, metadata: MetadataStore, channels: ChannelPool,
                 planner: RoutePlanner, timeout: float = 300.0) -> None:
        self.directory = directory
        self.metadata = metadata
        self.channels = channels
        self.planner = planner
        self.timeout = timeout
        self.encoded_items = 0  # items this router sent to encode workers
        self.cached_items = 0  # items served from the multimodal cache

    async def run(self, request: PreparedRequest) -> AsyncIterator[pb.GenerateChunk]:
        to_encode, images = await self._dispatch_plan(request)
        plan = self.planner.plan(self.directory.workers, len(request.input_ids), list(to_encode),
                                 request.prefix_blocks)
        tasks: list[asyncio.Task] = []
        generate = None
        try:
            tasks = [asyncio.create_task(self._encode(address, request, [to_encode[k] for k in keys], plan))
                     for address, keys in plan.encode.items()]
            decode_stub = pb_grpc.DecodeServiceStub(self.channels.get(plan.decode.address))
            generate = decode_stub.Generate(pb.GenerateRequest(request_id=request.request_id), timeout=self.timeout)
            prefill = asyncio.create_task(self._prefill(request, images, plan))
            await self._first_failure(prefill, tasks)
            async for chunk in generate:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                self.planner.suspect(plan.decode.address)
            raise _as_api_error(exc, "decode", plan.decode.address) from exc
        finally:
            for task in tasks:
                task.cancel()
            if generate is not None:
                generate.cancel()
            self.planner.release(plan, len(request.input_ids))

    async def _dispatch_plan(self, request: PreparedRequest) -> tuple[dict[str, pb.EncodeItem], list[pb.ImageRef]]:
        """Items to encode now (cache misses), and the ImageRefs marked accordingly."""
        keys = [item.item_key for ref in request.images for item in ref.items]
        records = await self.metadata.get_many(sorted(set(keys)))
        to_encode: dict[str, pb.EncodeItem] = {}
        images = []
        for ref in request.images:
            items = []
            for item in ref.items:
                record = records.get(item.item_key)
                cached = record is not None and record.state == "ready" and self.directory.is_live(record.owner)
                dispatched = not cached
                if dispatched and item.item_key not in to_encode:
                    to_encode[item.item_key] = pb.EncodeItem(item_key=item.item_key, image=ref.image,
                                                             tile_index=item.tile_index, n_tokens=item.n_tokens)
                self.cached_items += cached
                items.append(pb.EncodeItem(item_key=item.item_key, tile_index=item.tile_index,
                                           n_tokens=item.n_tokens, dispatched=dispatched))
            images.append(pb.ImageRef(image_key=ref.image_key, image=ref.image, items=items, width=ref.width,
                                      height=ref.height))
        self.encoded_items += len(to_encode)
        return to_encode, images

    async def _encode(self, address: str, request: PreparedRequest, items: list[pb.EncodeItem], plan: RoutePlan) -> None:
        """Encode on `address`; if that worker is gone, once more on another live one (prefill is
        waiting for these pushes, and would otherwise only recompute after its timeout)."""
        for attempt in range(2):
            stub = pb_grpc.EncodeServiceStub(self.channels.get(address))
            try:
                await stub.Encode(pb.EncodeRequest(request_id=request.request_id, items=items,
                                                   prefill_address=plan.prefill.address), timeout=self.timeout)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _as_api_error(exc, "encode", address) from exc
                log.warning("encode on %s failed (%s)", address, exc.code().name)
                self.planner.suspect(address)
                others = [w.address for w in self.directory.live("encode")
                          if w.address != address and w.address not in self.planner.suspects]
                if attempt or not others:
                    return  # prefill falls back to fetching or recomputing the items itself
                address = others[0]

    async def _prefill(self, request: PreparedRequest, images: list[pb.ImageRef], plan: RoutePlan) -> pb.PrefillResponse:
        stub = pb_grpc.PrefillServiceStub(self.channels.get(plan.prefill.address))
        message = pb.PrefillRequest(request_id=request.request_id, input_ids=request.input_ids, images=images,
                                    sampling=sampling_to_proto(request.chat.sampling(request.max_tokens)),
                                    decode_address=plan.decode.address)
        try:
            reply = await stub.Prefill(message, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                # prefill itself, or the decode worker it streams the KV cache to, is unreachable
                self.planner.suspect(plan.decode.address if plan.decode.address in (exc.details() or "")
                                     else plan.prefill.address)
            raise _as_api_error(exc, "prefill", plan.prefill.address) from exc
        request.cached_tokens = reply.cached_tokens
        return reply

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


def _as_api_error(exc: grpc.aio.AioRpcError, stage: str, address: str) -> APIError:
    status = GRPC_TO_HTTP.get(exc.code(), 503 if exc.code() == grpc.StatusCode.UNAVAILABLE else 500)
    code = "invalid_image" if stage == "encode" and status == 400 else f"{stage}_failed"
    return APIError(status, f"{stage} worker {address}: {exc.details() or exc.code().name}", code)
