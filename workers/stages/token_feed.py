"""The decode side of the token feed (`DecodeService.Feed`): one call per router
carries the chunks of every request that router follows here.

A Generate call per request costs the worker (and the router) a call's set-up
and one gRPC message per token: with gRPC's Python stack about 60 us per
message on each side, 1.2 ms per 16-token request on each side here, the CPU
that the engine's threads then lose. The feed sends what a decode step made
for all of a router's requests as one message, as vLLM's engine core hands its
API server each step's outputs together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from epd.v1 import stages_pb2 as pb

from .. import metrics
from ..messages import TokenEvent


class HandoffMissing(Exception):
    """No KV cache came for the request within the handoff wait."""


class RequestCancelled(Exception):
    """The router cancelled the request (its client left): its stream ends here."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} was cancelled")


def failure_status(event: Exception) -> tuple[grpc.StatusCode, str]:
    """How a request's stream ends when decode gives it an exception instead of a token."""
    if isinstance(event, RequestCancelled):
        return grpc.StatusCode.CANCELLED, str(event)
    return grpc.StatusCode.INTERNAL, f"decode failed: {event!r}"


def chunk_message(token: TokenEvent, prompt_tokens: int, completion: int) -> pb.GenerateChunk:
    return pb.GenerateChunk(token_ids=[token.token_id], text=token.text, finish_reason=token.finish_reason or "",
                            prompt_tokens=prompt_tokens, completion_tokens=completion)


class FeedOutbox:
    """The chunks a feed call has yet to send, and the wake-up of its writer."""

    def __init__(self) -> None:
        self.pending: list[pb.FeedChunk] = []
        self._ready = asyncio.Event()

    def add(self, request_id: str, chunk: pb.GenerateChunk) -> None:
        self.pending.append(pb.FeedChunk(request_id=request_id, chunk=chunk))
        self._ready.set()

    def fail(self, request_id: str, code: grpc.StatusCode, error: str) -> None:
        self.pending.append(pb.FeedChunk(request_id=request_id, code=code.value[0], error=error))
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    async def next_batch(self, over: Callable[[], bool]) -> pb.FeedBatch | None:
        """Everything pending, once there is some; None once nothing is pending and `over()`."""
        while not self.pending:
            if over():
                return None
            self._ready.clear()
            await self._ready.wait()
        batch = pb.FeedBatch(chunks=self.pending)
        self.pending = []
        return batch


class FeedFollower:
    """Takes one followed request's token events (from the decode loop) into the feed's outbox; `end(request
    id, finished)` once its stream is over."""

    def __init__(self, outbox: FeedOutbox, request_id: str, prompt_tokens: int,
                 end: Callable[[str, bool], None]) -> None:
        self.outbox = outbox
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.end = end
        self.completion = 0
        self.start = time.perf_counter()

    def __call__(self, event: TokenEvent | Exception) -> None:
        if isinstance(event, Exception):
            self.outbox.fail(self.request_id, *failure_status(event))
            self.end(self.request_id, False)
            return
        self.completion += 1
        self.outbox.add(self.request_id, chunk_message(event, self.prompt_tokens, self.completion))
        if event.finish_reason:
            metrics.STAGE_LATENCY.labels("decode").observe(time.perf_counter() - self.start)
            self.end(self.request_id, True)
