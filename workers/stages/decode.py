"""Decode worker: receives KV caches, runs continuous batching (sequences join
and leave at every step) and streams tokens straight back to the router."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..engine import DecodeEngine
from ..messages import KVHandoff, TokenEvent
from ..wire import handoff_from_chunks
from .context import WorkerContext
from .supervision import SupervisedLoop

log = logging.getLogger(__name__)


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, ctx: WorkerContext, engine: DecodeEngine, handoff_wait: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.engine = engine
        self.handoff_wait = handoff_wait
        self.clock = clock
        self.arrived: dict[str, tuple[KVHandoff, float]] = {}  # KV received, not yet taken by Generate
        self.arrival_events: dict[str, asyncio.Event] = {}  # Generate calls waiting for their KV
        self.streams: dict[str, asyncio.Queue[TokenEvent | Exception]] = {}  # request id -> its token events
        self.joining: list[KVHandoff] = []
        self.cancelled: set[str] = set()
        self.wakeup = asyncio.Event()
        self._loop_task = SupervisedLoop("decode", ctx.health if ctx is not None else None)

    def start(self) -> None:
        self._loop_task.start(self._loop)

    async def stop(self) -> None:
        await self._loop_task.stop()

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    async def TransferKV(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.TransferAck:
        header, layers, request_id = None, [], ""
        async for chunk in request_iterator:
            request_id = chunk.request_id
            if chunk.HasField("header"):
                header = chunk.header
            else:
                layers.append(chunk.layer)
        if header is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"KV stream for {request_id!r} has no header")
        try:
            handoff = self.engine.validated(handoff_from_chunks(request_id, header, layers))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._drop_orphans()
        self.arrived[request_id] = (handoff, self.clock())
        if request_id in self.arrival_events:
            self.arrival_events[request_id].set()
        return pb.TransferAck(layers=len(layers))

    def _drop_orphans(self) -> None:
        """KV nobody will take: its Generate gave up (timed out, or the client left) before it came."""
        deadline = self.clock() - self.handoff_wait
        for request_id in [r for r, (_, at) in self.arrived.items() if at < deadline and r not in self.arrival_events]:
            log.warning("dropping the KV cache of request %s: no Generate took it", request_id)
            del self.arrived[request_id]

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id
        if request_id not in self.arrived:
            event = self.arrival_events.setdefault(request_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), self.handoff_wait)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no KV cache arrived for request {request_id} within {self.handoff_wait}s")
            finally:
                self.arrival_events.pop(request_id, None)
        handoff, _ = self.arrived.pop(request_id)
        queue: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
        self.streams[request_id] = queue
        metrics.IN_FLIGHT.labels("decode").inc()
        start = time.perf_counter()
        completion = 0
        finished = False
        try:
            self.joining.append(handoff)
            self.wakeup.set()
            while True:
                token = await queue.get()
                if isinstance(token, ValueError):  # e.g. a sequence that can never fit
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(token))
                if isinstance(token, Exception):
                    await context.abort(grpc.StatusCode.INTERNAL, f"decode failed: {token!r}")
                completion += 1
                yield pb.GenerateChunk(token_ids=[token.token_id], text=token.text,
                                       finish_reason=token.finish_reason or "", prompt_tokens=handoff.prompt_tokens,
                                       completion_tokens=completion)
                if token.finish_reason:
                    finished = True
                    break
            metrics.STAGE_LATENCY.labels("decode").observe(time.perf_counter() - start)
        finally:
            if self.streams.pop(request_id, None) is not None and not finished:
                self.cancelled.add(request_id)  # client went away: leave the batch at the next step
                self.wakeup.set()
            metrics.IN_FLIGHT.labels("decode").dec()

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        known = request.request_id in self.streams or request.request_id in self.arrived
        self.arrived.pop(request.request_id, None)
        if request.request_id in self.streams:
            self.cancelled.add(request.request_id)
            self.wakeup.set()
        return pb.CancelResponse(cancelled=known)

    # ---- the continuous-batching loop ------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.engine.active and not self.joining:
                self.wakeup.clear()
                await self.wakeup.wait()
            joining, self.joining = self.joining, []
            cancelled, self.cancelled = self.cancelled, set()
            try:
                events = await self.ctx.compute("decode", self._step, joining, cancelled)
            except Exception as exc:  # a failed step must not kill the loop: fail its requests instead
                log.exception("decode step failed")
                failed = await self.ctx.compute("decode", self.engine.fail_all)
                events = [(request_id, exc) for request_id in failed]
            for request_id, event in events:
                queue = self.streams.get(request_id)
                if queue is not None:
                    queue.put_nowait(event)
            metrics.QUEUE_DEPTH.labels("decode").set(len(self.engine.waiting) + len(self.engine.swapped))
            if self.engine.running:
                metrics.BATCH_SIZE.labels("decode").observe(len(self.engine.running))
            metrics.KV_USAGE.set(self.engine.kv_usage)
            metrics.KV_TOKENS.set(self.engine.kv_tokens)

    def _step(self, joining: list[KVHandoff], cancelled: set[str]) -> list[tuple[str, TokenEvent | Exception]]:
        for request_id in cancelled:
            self.engine.cancel(request_id)
        events: list[tuple[str, TokenEvent | Exception]] = []
        for handoff in joining:
            if handoff.request_id in cancelled:
                continue
            try:
                events.append((handoff.request_id, self.engine.add(handoff)))
            except ValueError as exc:  # it could never fit: fail it alone
                events.append((handoff.request_id, exc))
        return events + [(event.request_id, event) for event in self.engine.step()]

