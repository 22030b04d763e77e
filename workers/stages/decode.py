"""Decode worker: reserves KV blocks for a handoff before the KV comes (a full
pool makes prefill wait), receives it over the pair's data path, runs
continuous batching (sequences join and leave at every step) and streams
tokens straight back to the router."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..background import spawn
from ..engine import DecodeEngine
from ..engine.decode import DecodeSequence
from ..messages import KVHandoff, TokenEvent
from ..timeouts import within
from ..transport.kv_paths import PATHS
from ..transport.kv_receiver import KVReceiver, Reservation, ReservationTimeout, ReserveSpec, TcpEndpoint
from ..transport.kv_sender import LOCAL_DECODERS
from ..transport.nixl_path import NixlAgent
from ..transport.raw_frames import write_handler
from ..wire import handoff_from_commit, layout_from_proto
from .context import WorkerContext
from .supervision import SupervisedLoop
from .token_feed import (
    FeedFollower,
    FeedOutbox,
    HandoffMissing,
    RequestCancelled,
    chunk_message,
    failure_status,
)

log = logging.getLogger(__name__)

Arrival = tuple[KVHandoff, list[int] | None]  # the handoff, and the blocks adopted in-process (else None)


@dataclass
class BatchChanges:
    """What the server changed in the batch between two steps."""

    joining: list[tuple[DecodeSequence, list[int] | None]]  # opened sequences and their adopted blocks
    cancelled: set[str]  # request ids whose client went away


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, ctx: WorkerContext, engine: DecodeEngine, handoff_wait: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, shared_fd: int | None = None,
                 cuda_ipc_handle: bytes = b"", kv_paths: frozenset[str] = frozenset(PATHS),
                 nixl: NixlAgent | None = None, tcp: TcpEndpoint | None = None) -> None:
        self.ctx = ctx
        self.engine = engine
        self.handoff_wait = handoff_wait
        self.clock = clock
        self.receiver = KVReceiver(engine, self._compute, wait=handoff_wait, lease=handoff_wait,
                                   shared_fd=shared_fd, cuda_ipc_handle=cuda_ipc_handle, clock=lambda: self.clock(),
                                   allowed=kv_paths, nixl=nixl, tcp=tcp)
        self.arrived: dict[str, tuple[Arrival, float]] = {}  # committed, not yet taken by Generate
        self.arrival_events: dict[str, asyncio.Event] = {}  # Generate calls waiting for their commit
        self.streams: dict[str, Callable[[TokenEvent | Exception], None]] = {}  # request id -> its events' taker
        self.joining: list[tuple[DecodeSequence, list[int] | None]] = []  # opened, joining at the next step
        self.cancelled: set[str] = set()
        self.wakeup = asyncio.Event()
        self.steps_alone = True  # False: a colocated worker's mixed scheduler steps this engine
        self._loop_task = SupervisedLoop("decode", ctx.health if ctx is not None else None)

    def start(self) -> None:
        if self.steps_alone:
            self._loop_task.start(self._loop)
        self._sweeper = SupervisedLoop("decode handoff sweep", self.ctx.health if self.ctx is not None else None)
        self._sweeper.start(self._sweep)
        spawn(self.receiver.start())
        if self.ctx is not None and "inproc" in self.receiver.offered:
            LOCAL_DECODERS[self.ctx.address] = self

    async def stop(self) -> None:
        if self.ctx is not None:
            LOCAL_DECODERS.pop(self.ctx.address, None)
        await self._loop_task.stop()
        await self._sweeper.stop()
        await self.receiver.stop()

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        """The raw-frame KV data path, served beside the DecodeService."""
        return [write_handler(self.receiver.write_stream)]

    async def _compute(self, fn, *args):
        return await (self.ctx.compute("decode", fn, *args) if self.ctx is not None else _direct(fn, *args))

    @property
    def pool(self):
        return self.engine.pool

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    # ---- the handoff: reserve, (data path), commit ------------------------------------
    async def ReserveKV(self, request: pb.ReserveKVRequest, context: grpc.aio.ServicerContext) -> pb.ReserveKVReply:
        try:
            spec = ReserveSpec(request.request_id, request.prompt_tokens, request.max_tokens, request.sender_host,
                               list(request.paths), layout_from_proto(request.layout))
            reservation = await self.receiver.reserve(spec)
        except ValueError as exc:  # never fits, or another model's KV
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ReservationTimeout as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return pb.ReserveKVReply(block_ids=reservation.blocks, path=reservation.path,
                                 shm_socket=reservation.shm_socket, cuda_ipc_handle=reservation.cuda_ipc_handle,
                                 nixl_metadata=reservation.nixl_metadata, tcp_port=reservation.tcp_port,
                                 tcp_token=reservation.tcp_token)

    async def CommitKV(self, request: pb.CommitKVRequest, context: grpc.aio.ServicerContext) -> pb.CommitKVReply:
        try:
            self._arrive(self.engine.validated(handoff_from_commit(request)), None)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RequestCancelled as exc:
            await context.abort(grpc.StatusCode.CANCELLED, str(exc))
        return pb.CommitKVReply()

    async def ReleaseKV(self, request: pb.ReleaseKVRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseKVReply:
        return pb.ReleaseKVReply(released=await self.receiver.release(request.request_id))

    # in-process senders (colocated prefill) call these instead of the RPCs
    async def reserve_local(self, spec: ReserveSpec) -> Reservation:
        return await self.receiver.reserve(spec, local=True)

    async def commit_local(self, handoff: KVHandoff, adopted_blocks: list[int]) -> None:
        self._arrive(self.engine.validated(handoff, adopted_blocks), adopted_blocks)

    async def release_local(self, request_id: str) -> None:
        await self.receiver.release(request_id)

    def _arrive(self, handoff: KVHandoff, adopted: list[int] | None) -> None:
        reservation = self.receiver.take(handoff.request_id)
        if reservation is None:
            raise KeyError(f"request {handoff.request_id} has no KV reservation here (released or expired)")
        if reservation.cancelled:  # its client left while the KV was on its way
            spawn(self._discard((handoff, adopted)))
            raise RequestCancelled(handoff.request_id)
        self.arrived[handoff.request_id] = ((handoff, adopted), self.clock())
        if handoff.request_id in self.arrival_events:
            self.arrival_events[handoff.request_id].set()
        spawn(self._drop_orphans())

    async def _drop_orphans(self) -> None:
        """KV nobody will take: its Generate gave up (timed out, or the client left) before it came."""
        deadline = self.clock() - self.handoff_wait
        for request_id in [r for r, (_, at) in self.arrived.items() if at < deadline and r not in self.arrival_events]:
            log.warning("dropping the KV cache of request %s: no Generate took it", request_id)
            await self._discard(self.arrived.pop(request_id)[0])

    async def _sweep(self) -> None:
        """Reservations whose sender died and KV whose Generate never came are released within a
        fraction of the handoff wait, even when no other handoff comes along to notice them."""
        while True:
            await asyncio.sleep(self.handoff_wait / 4)  # a periodic sweep, not synchronisation
            await self.receiver.expire()
            await self._drop_orphans()

    async def _discard(self, arrival: Arrival) -> None:
        handoff, adopted = arrival
        await self._compute(self.engine.release, handoff.request_id, adopted)
        self.receiver.capacity_changed()

    # ---- the token streams: a Generate call per request, or the router's token feed ------
    async def _opened(self, request_id: str) -> tuple[Arrival, DecodeSequence, TokenEvent]:
        """The request's committed KV (waited for, up to the handoff wait) opened as a sequence, and its
        first token; HandoffMissing if no KV came."""
        if request_id not in self.arrived:
            event = self.arrival_events.setdefault(request_id, asyncio.Event())
            try:
                await within(event.wait(), self.handoff_wait)
            except asyncio.TimeoutError:
                raise HandoffMissing(f"no KV cache arrived for request {request_id} within {self.handoff_wait}s") \
                    from None
            finally:
                self.arrival_events.pop(request_id, None)
        arrival, _ = self.arrived.pop(request_id)
        # the first token (prefill sampled it) goes out now, not after the batch's next step
        seq, first = self.engine.open(arrival[0])
        return arrival, seq, first

    async def _follow(self, opened: tuple[Arrival, DecodeSequence, TokenEvent],
                      deliver: Callable[[TokenEvent | Exception], None]) -> None:
        """Stream an opened request: its first token now, the others as steps make them (`finished`)."""
        arrival, seq, first = opened
        self.streams[seq.request_id] = deliver
        metrics.IN_FLIGHT.labels("decode").inc()
        deliver(first)
        if first.finish_reason is None:
            self.joining.append((seq, arrival[1]))
            self.wakeup.set()
        else:
            await self._discard(arrival)

    def _unfollow(self, request_id: str, finished: bool) -> None:
        """The request's stream ended; one that ended before its last token leaves the batch."""
        if self.streams.pop(request_id, None) is None:
            return
        if not finished:  # the client went away, or its step failed
            self.cancelled.add(request_id)
            self.wakeup.set()
        metrics.IN_FLIGHT.labels("decode").dec()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id
        try:
            opened = await self._opened(request_id)
        except HandoffMissing as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        queue: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
        start = time.perf_counter()
        completion = 0
        finished = False
        try:
            await self._follow(opened, queue.put_nowait)
            while True:
                token = await queue.get()
                if isinstance(token, Exception):
                    await context.abort(*failure_status(token))
                completion += 1
                yield chunk_message(token, opened[0][0].prompt_tokens, completion)
                if token.finish_reason:
                    finished = True
                    break
            metrics.STAGE_LATENCY.labels("decode").observe(time.perf_counter() - start)
        finally:
            self._unfollow(request_id, finished)

    async def Feed(self, request_iterator: AsyncIterator[pb.FeedRequest], context: grpc.aio.ServicerContext):
        """The router's token feed: it names requests to follow (or leave), and gets every followed request's
        chunks batched, one message per wake-up (a decode step's tokens together)."""
        outbox = FeedOutbox()
        following: dict[str, asyncio.Task] = {}  # request id -> the task that opened it, until its stream ends

        def end(request_id: str, finished: bool) -> None:
            self._unfollow(request_id, finished)
            task = following.pop(request_id, None)
            if task is not None:
                if task is not asyncio.current_task():
                    task.cancel()  # it left while it still waits for its KV
                if self.ctx is not None:
                    self.ctx.calls.ended()
                outbox.wake()

        async def follow(request_id: str) -> None:
            try:
                opened = await self._opened(request_id)
            except HandoffMissing as exc:
                outbox.fail(request_id, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
                end(request_id, False)
                return
            await self._follow(opened, FeedFollower(outbox, request_id, opened[0][0].prompt_tokens, end))

        async def read_requests() -> None:
            async for message in request_iterator:
                if message.leave:
                    end(message.request_id, False)
                elif message.request_id not in following:
                    if self.ctx is not None:
                        self.ctx.calls.started()
                    following[message.request_id] = asyncio.create_task(follow(message.request_id))

        reader = asyncio.create_task(read_requests())
        reader.add_done_callback(lambda _: outbox.wake())
        try:
            while (batch := await outbox.next_batch(lambda: reader.done() and not following)) is not None:
                yield batch
        finally:
            reader.cancel()
            for request_id in list(following):  # the router went away: its requests leave the batch
                end(request_id, False)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        request_id = request.request_id
        known = request_id in self.streams or request_id in self.arrived or request_id in self.receiver.reservations
        entry = self.arrived.pop(request_id, None)
        if entry is not None:
            await self._discard(entry[0])
        await self.receiver.cancel(request_id)
        deliver = self.streams.get(request_id)
        if deliver is not None:  # the stream ends here, whether or not the router then leaves it
            deliver(RequestCancelled(request_id))
            self.cancelled.add(request_id)
            self.wakeup.set()
        return pb.CancelResponse(cancelled=known)

    # ---- the continuous-batching loop ------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.engine.active or self.joining)

    async def _loop(self) -> None:
        while True:
            if not self.has_work:
                self.wakeup.clear()
                await self.wakeup.wait()
            changes = self.take_changes()
            try:
                events = await self.ctx.compute("decode", self._step, changes)
            except Exception as exc:  # a failed step must not kill the loop: fail its requests instead
                log.exception("decode step failed")
                failed = await self.ctx.compute("decode", self.engine.fail_all)
                events = [(request_id, exc) for request_id in failed]
            self.finished(events)

    def opening(self, request_id: str) -> bool:
        """The request's KV came while its stream waited: the stream opens it at its next turn."""
        return request_id in self.arrived and request_id in self.arrival_events

    def take_changes(self) -> BatchChanges:
        """The sequences that joined and the requests cancelled since the last step."""
        changes = BatchChanges(self.joining, self.cancelled)
        self.joining, self.cancelled = [], set()
        return changes

    def apply(self, changes: BatchChanges) -> None:
        """Before a step (compute thread): cancelled requests leave, the others join."""
        for request_id in changes.cancelled:
            self.engine.cancel(request_id)
        for seq, adopted in changes.joining:
            if seq.request_id in changes.cancelled:
                self.engine.release(seq.request_id, adopted)
            else:
                self.engine.join(seq, adopted)

    def _step(self, changes: BatchChanges) -> list[tuple[str, TokenEvent | Exception]]:
        self.apply(changes)
        return [(event.request_id, event) for event in self.engine.step()]

    def finished(self, events: list[tuple[str, TokenEvent | Exception]]) -> None:
        """After a step: each event to its stream, then the freed capacity and the metrics."""
        for request_id, event in events:
            deliver = self.streams.get(request_id)
            if deliver is not None:
                deliver(event)
        self.receiver.capacity_changed()
        metrics.QUEUE_DEPTH.labels("decode").set(len(self.engine.waiting) + len(self.engine.swapped))
        if self.engine.running:
            metrics.BATCH_SIZE.labels("decode").observe(len(self.engine.running))
        metrics.KV_USAGE.set(self.engine.kv_usage)
        metrics.KV_TOKENS.set(self.engine.kv_tokens)


async def _direct(fn, *args):
    return fn(*args)
