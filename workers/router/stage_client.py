"""How the router calls the stages: one interface over internal messages
(`StageClient`), with a gRPC implementation for real workers
(`GrpcStageClient`) and an in-process one that calls stage servicers directly
(`InProcessStageClient`), so that the pipeline and the servicers can be tested
without sockets. A failed call raises `StageCallError`, which says how it failed
(a lost worker, bad input, ...) and which peer the failing stage blamed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from ..messages import EncodeItem, GeneratedChunk, PrefillCall
from ..wire import failed_peer

# A worker that is gone or shutting down fails this way; another worker may well succeed.
LOST_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504}


@dataclass
class StageCallError(Exception):
    """A stage call failed with `code`; `blamed` is the (stage, address) of a peer the stage said
    was at fault (prefill's decode worker), from the call's structured metadata."""

    code: grpc.StatusCode
    detail: str
    blamed: tuple[str, str] | None = None

    @classmethod
    def of(cls, code: grpc.StatusCode, detail: str,
           metadata: Iterable[tuple[str, str | bytes]] | None = None) -> StageCallError:
        return cls(code, detail or code.name, failed_peer(metadata))

    def __str__(self) -> str:
        return self.detail

    @property
    def lost(self) -> bool:
        """The worker (or the peer it blamed) was lost rather than the request bad: retry elsewhere."""
        return self.code in LOST_CODES

    @property
    def invalid(self) -> bool:
        return self.code == grpc.StatusCode.INVALID_ARGUMENT

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 503 if self.lost else 500)


class DecodeStream(Protocol):
    """A request's tokens as decode produces them (its Generate call, or its place on the token feed)."""

    async def read(self) -> GeneratedChunk | None:
        """The next chunk; None once the stream ended; StageCallError if it failed."""

    async def ended_lost(self) -> bool:
        """Whether the call already ended because its worker was lost."""

    def cancel(self) -> None:
        """Stop reading (after the worker got its Cancel); the worker drops a request still streaming."""


class StageClient(Protocol):
    """Calls under a deadline (`timeout` seconds; `cancel_timeout` for Cancel, which must not hold up
    the end of a request)."""

    timeout: float
    cancel_timeout: float

    async def encode(self, address: str, request_id: str, items: Sequence[tuple[EncodeItem, bytes]],
                     prefill_address: str) -> None:
        """Encode `(item, image bytes)` pairs on `address`, pushing the embeddings to `prefill_address`."""

    async def prefill(self, address: str, call: PrefillCall) -> int:
        """Prefill on `address`, handing the KV to the call's decode worker; the prompt tokens the
        prefix cache supplied."""

    def generate(self, address: str, request_id: str) -> DecodeStream:
        """Open the decode stream of `request_id` (before prefill: decode then waits for its KV)."""

    async def cancel(self, stage: str, address: str, request_id: str) -> bool:
        """Tell `stage` at `address` to drop `request_id`; whether it held it."""
