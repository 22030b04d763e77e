"""Prefill worker: admit a request at once (its cached prefix is found and
pinned first, so images inside it need no embedding), wait only for the
embeddings still missing, hand the prompt to the engine's scheduler (chunked,
packed batches under the token budget), and stream each KV cache to the
decode worker chosen for the request."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..background import spawn
from ..engine import PrefillEngine, PrefillResult
from ..messages import ImageSize, KVHandoff, PrefillJob
from ..transport.embedding_transport import LOCAL_EMBEDDING_SINKS
from ..transport.kv_paths import PATHS
from ..transport.kv_sender import KVHandoffSink, KVSender
from ..transport.shm_embeddings import EmbeddingMailbox
from ..wire import failed_peer_metadata, sampling_from_proto, tensor_from_proto
from .context import WorkerContext
from .embeddings import EmbeddingSource, ItemSources
from .supervision import SupervisedLoop

log = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, ctx: WorkerContext, engine: PrefillEngine, cache_bytes: int,
                 embedding_wait: float = 30.0, kv_paths: frozenset[str] = frozenset(PATHS)) -> None:
        self.ctx = ctx
        self.engine = engine
        self.kv = KVSender(ctx.channels, engine.pool, allowed=kv_paths)
        self.kv_paths = kv_paths
        self.mailbox: EmbeddingMailbox | None = None  # encode workers on this host push embeddings here
        self.embeddings = EmbeddingSource(ctx, engine.language, cache_bytes, embedding_wait)
        self.pending: dict[str, asyncio.Future[KVHandoff]] = {}  # request id -> its prefill result
        # Prefill calls handing KV to a decode servicer of this process (a colocated worker's scheduler waits
        # a few event-loop turns for their embeddings, reservations and handoffs between steps, see
        # stages.colocated); of those, the ones not queued yet -> the embeddings they wait for (none once
        # they reserve their KV)
        self.local_handoffs: set[str] = set()
        self.arriving: dict[str, tuple[str, ...]] = {}
        self.wakeup = asyncio.Event()
        self.active_requests = 0
        self.steps_alone = True  # False: a colocated worker's mixed scheduler steps this engine
        self._loop = SupervisedLoop("prefill scheduler", ctx.health)

    def start(self) -> None:
        if self.steps_alone:
            self._loop.start(self._run)
        if self.ctx is not None:  # an encode stage in this process hands embeddings over by reference
            LOCAL_EMBEDDING_SINKS[self.ctx.address] = self._receive
            if "shm" in self.kv_paths:
                self.mailbox = EmbeddingMailbox(self._receive_all)
                self.mailbox.start()

    async def stop(self) -> None:
        if self.ctx is not None:
            LOCAL_EMBEDDING_SINKS.pop(self.ctx.address, None)
        if self.mailbox is not None:
            await self.mailbox.stop()
        await self._loop.stop()

    def _receive(self, key: str, tensor) -> None:
        self.embeddings.store(key, self.embeddings.validated(tensor))

    def _receive_all(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """A push through the mailbox: every embedding is checked before any is stored."""
        for key, tensor in items:
            try:
                self.embeddings.validated(tensor)
            except ValueError as exc:
                raise ValueError(f"embedding {key}: {exc}") from exc
        for key, tensor in items:
            self.embeddings.store(key, tensor)

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting) + len(self.engine.incoming)

    @property
    def outstanding_tokens(self) -> int:
        return self.engine.queued_tokens

    # ---- embeddings in ---------------------------------------------------------
    async def PushEmbeddings(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PushAck:
        received = 0
        async for chunk in request_iterator:
            try:
                tensor = self.embeddings.validated(tensor_from_proto(chunk.embedding))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"embedding {chunk.item_key}: {exc}")
            self.embeddings.store(chunk.item_key, tensor)
            received += 1
        return pb.PushAck(received=received)

    # ---- the request -----------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        start = time.perf_counter()
        self.active_requests += 1
        metrics.IN_FLIGHT.labels("prefill").inc()
        sink: KVHandoffSink | None = None
        try:
            sources = ItemSources()
            job, sink = await self._admit(request, sources, context)
            handoff = await self._compute(job, context)
            metrics.PREFIX_CACHE_TOKENS.labels("hit").inc(handoff.cached_tokens)
            metrics.PREFIX_CACHE_TOKENS.labels("computed").inc(handoff.prompt_tokens - handoff.cached_tokens)
            computed = time.perf_counter()
            try:
                await sink.finish()
                await sink.commit(handoff)
            except (grpc.aio.AioRpcError, OSError, RuntimeError) as exc:
                details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"KV transfer to decode worker {request.decode_address} failed: {details}",
                                    trailing_metadata=failed_peer_metadata("decode", request.decode_address))
            self.engine.release(request.request_id, adopted=sink.path == "inproc")
            metrics.TRANSFER_WAIT.labels(sink.path).observe(time.perf_counter() - computed)
            sink = None  # committed: decode owns the KV now
            metrics.STAGE_LATENCY.labels("prefill").observe(time.perf_counter() - start)
            return pb.PrefillResponse(first_token=handoff.first_token, prompt_tokens=handoff.prompt_tokens,
                                      items=pb.ItemSources(from_buffer=sources.buffer, fetched=sources.fetched,
                                                          recomputed=sources.recomputed),
                                      cached_tokens=handoff.cached_tokens)
        finally:
            self.local_handoffs.discard(request.request_id)
            self.arriving.pop(request.request_id, None)
            try:
                if sink is not None:  # failed or cancelled after the reservation: give everything back, to the
                    # end even when the call is cancelled meanwhile (the router cancels it after its Cancel)
                    await asyncio.shield(spawn(self._abort(sink)))
            finally:
                self.active_requests -= 1
                metrics.IN_FLIGHT.labels("prefill").dec()

    async def _admit(self, request: pb.PrefillRequest, sources: ItemSources,
                     context: grpc.aio.ServicerContext) -> tuple[PrefillJob, KVHandoffSink]:
        """The job with its embeddings, and the decode worker's reservation for its KV (this waits while
        that worker is full: back-pressure)."""
        job = PrefillJob(request_id=request.request_id, input_ids=list(request.input_ids), image_embeddings=[],
                         image_sizes=[ImageSize(ref.width, ref.height) for ref in request.images],
                         sampling=sampling_from_proto(request.sampling),
                         image_keys=[ref.image_key for ref in request.images])
        # An image wholly inside the cached prefix needs no embedding: do not wait for one.
        job.prefix = self.engine.find_prefix(job)
        try:
            needed = self.engine.needed_images(job, job.prefix)
            local = self.kv.local_decode(request.decode_address) is not None
            if local:
                self.local_handoffs.add(job.request_id)
                self.arriving[job.request_id] = tuple(
                    item.item_key for ref, need in zip(request.images, needed, strict=True) if need for item in ref.items)
            job.image_embeddings = list(await asyncio.gather(
                *(self.embeddings.image_embedding(ref, request.request_id, sources) if need else _nothing()
                  for ref, need in zip(request.images, needed, strict=True))))
            if local:
                self.arriving[job.request_id] = ()  # its reservation runs on this worker's compute thread
            job.kv_sink = await self.kv.open(request.decode_address, job.request_id, len(job.input_ids),
                                             job.sampling.max_tokens)
            return job, job.kv_sink
        except LookupError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() in _PASSED_ON else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"decode worker {request.decode_address}: {exc.details() or exc.code().name}",
                                trailing_metadata=failed_peer_metadata("decode", request.decode_address))
        finally:
            if job.kv_sink is None:
                self.engine.release_prefix(job.prefix)
        raise AssertionError("unreachable: abort raises")

    async def _compute(self, job: PrefillJob, context: grpc.aio.ServicerContext) -> KVHandoff:
        future = asyncio.get_running_loop().create_future()
        self.pending[job.request_id] = future
        try:
            try:
                self.engine.add(job)
            except ValueError as exc:
                self.engine.release_prefix(job.prefix)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            finally:
                self.arriving.pop(job.request_id, None)
            self.wakeup.set()
            try:
                return await future
            except asyncio.CancelledError:  # the caller went away: free what the request holds
                self.engine.cancel(job.request_id)
                raise
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # the batch failed on our side (e.g. out of device memory)
                await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc!r}")
            raise AssertionError("unreachable: abort raises")
        finally:
            self.pending.pop(job.request_id, None)

    async def _abort(self, sink: KVHandoffSink) -> None:
        """Stop writing into the reservation, then give it and the prompt's blocks back. The compute
        thread is drained first, so no layer write of this request is still on its way to decode."""
        sink.aborted = True
        await self.ctx.compute("prefill", lambda: None)
        await sink.abort()
        self.engine.release(sink.reservation.request_id)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        """The client left: its Prefill call ends CANCELLED and the prompt's blocks are freed."""
        future = self.pending.get(request.request_id)
        if future is not None and not future.done():
            future.cancel()
        return pb.CancelResponse(cancelled=future is not None)

    # ---- the scheduler loop --------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self.engine.has_work:
                self.wakeup.clear()
                await self.wakeup.wait()
            self.finished(await self.ctx.compute("prefill", self.engine.step))

    def finished(self, results: list[PrefillResult]) -> None:
        """After a step: its metrics, and each prompt it finished to the call waiting for it."""
        metrics.QUEUE_DEPTH.labels("prefill").set(self.queue_depth)
        if self.engine.last_batch:
            metrics.BATCH_SIZE.labels("prefill").observe(self.engine.last_batch)
        for result in results:
            self._deliver(result)

    def _deliver(self, result: PrefillResult) -> None:
        future = self.pending.get(result.request_id)
        if future is None or future.done():  # its caller went away: nobody will hand its KV off
            self.engine.release(result.request_id)
            return
        if result.error is not None:
            log.error("prefill of %s failed: %r", result.request_id, result.error)
            future.set_exception(result.error)
        elif result.handoff is not None:  # a result is a handoff or an error
            future.set_result(result.handoff)


# decode's answers prefill passes on as they are: the request can never fit, or decode stayed full
_PASSED_ON = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


async def _nothing() -> None:
    return None
