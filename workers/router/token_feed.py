"""The router side of the token feed (`DecodeService.Feed`, see
epd.workers.stages.token_feed): one call per decode worker, over which the
router follows each request's tokens. A request's stream is a `FeedDecodeStream`,
the same `DecodeStream` the pipeline reads from a Generate call; when the feed
call fails (the worker is gone), every request on it fails the way its Generate
call would have."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from ..messages import GeneratedChunk
from ..wire import chunk_from_proto
from .stage_client import StageCallError

log = logging.getLogger(__name__)

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
Delivery = GeneratedChunk | StageCallError


class TokenFeed:
    """One Feed call to a decode worker, opened at once; `follow` a request to read its chunks."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.failure: StageCallError | None = None  # set once the call ended
        self.retiring = False  # a newer feed serves new requests: end this one once its readers are done
        self._readers: dict[str, asyncio.Queue[Delivery]] = {}
        self._requests: asyncio.Queue[pb.FeedRequest | None] = asyncio.Queue()
        self._call = pb_grpc.DecodeServiceStub(channel).Feed(self._outgoing())
        self.done = asyncio.create_task(self._read())  # the reader of the call's batches

    @property
    def open(self) -> bool:
        return self.failure is None and not self.retiring

    def follow(self, request_id: str) -> FeedDecodeStream:
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        if self.failure is not None:
            queue.put_nowait(self.failure)
        else:
            self._readers[request_id] = queue
            self._requests.put_nowait(pb.FeedRequest(request_id=request_id))
        return FeedDecodeStream(self, request_id, queue)

    def leave(self, request_id: str, tell: bool) -> None:
        """Stop reading `request_id`; `tell` the worker when its stream had not ended there."""
        if self._readers.pop(request_id, None) is not None and tell and self.failure is None:
            self._requests.put_nowait(pb.FeedRequest(request_id=request_id, leave=True))
        self._end_if_retired()

    def retire(self) -> None:
        self.retiring = True
        self._end_if_retired()

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self.done, return_exceptions=True)

    def _end_if_retired(self) -> None:
        if self.retiring and not self._readers:
            self._requests.put_nowait(None)  # the worker ends the call once nothing is followed

    async def _outgoing(self) -> AsyncIterator[pb.FeedRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        failure = StageCallError(grpc.StatusCode.UNAVAILABLE, "the decode worker ended the token feed")
        try:
            async for batch in self._call:
                for item in batch.chunks:
                    queue = self._readers.get(item.request_id)
                    if queue is None:
                        continue  # left, or already failed
                    if item.code:
                        self._readers.pop(item.request_id)
                        queue.put_nowait(StageCallError.of(STATUS_CODES[item.code], item.error))
                    else:
                        queue.put_nowait(chunk_from_proto(item.chunk))
        except grpc.aio.AioRpcError as exc:
            failure = StageCallError.of(exc.code(), exc.details() or "", exc.trailing_metadata())
        except asyncio.CancelledError:
            failure = StageCallError(grpc.StatusCode.CANCELLED, "the router closed the token feed")
            raise
        finally:
            self.failure = failure
            if self._readers:
                log.warning("token feed to a decode worker ended with %d request(s) on it: %s",
                            len(self._readers), failure)
            for queue in self._readers.values():
                queue.put_nowait(failure)
            self._readers.clear()


class FeedDecodeStream:
    """One request's chunks from its decode worker's token feed."""

    def __init__(self, feed: TokenFeed, request_id: str, queue: asyncio.Queue[Delivery]) -> None:
        self.feed = feed
        self.request_id = request_id
        self.queue = queue
        self.ended = False  # the last chunk or an error came: the worker holds nothing of it

    async def read(self) -> GeneratedChunk | None:
        if self.ended:
            return None
        delivery = await self.queue.get()
        if isinstance(delivery, StageCallError):
            self.ended = True
            raise delivery
        if delivery.finish_reason:
            self.ended = True
            self.feed.leave(self.request_id, tell=False)
        return delivery

    async def ended_lost(self) -> bool:
        failure = self.feed.failure
        return failure is not None and failure.lost

    def cancel(self) -> None:
        self.feed.leave(self.request_id, tell=not self.ended)
