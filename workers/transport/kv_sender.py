"""Prefill side of the KV handoff. `KVSender.open` reserves blocks at the
decode worker (waiting while it is full) and returns a `KVHandoffSink` for the
request: the prefill engine calls its `write_layer` on the compute thread as
each layer's KV is complete, so the bytes move while the next layer computes;
`finish` waits for the data path, `commit` hands decode the metadata, `abort`
gives the reservation back.

Per path: `inproc` does nothing per layer (decode adopts the prefill blocks);
`shm` and `cuda_ipc` copy the layer's blocks straight into decode's pool (on
CUDA on a side stream, after the layer's kernels); `nixl` posts the layer's
RDMA writes and waits for them all at the end; `tcp` queues the layer for a
sender thread that writes its blocks to decode's listener; `grpc` queues the
layer for a sender task that gathers its blocks off the compute thread and
streams raw frames."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..background import spawn
from ..engine.kv_pool import KVLayout, KVPool
from ..messages import KVHandoff
from ..wire import layout_to_proto, sampling_to_proto
from .block_copy import BlockCopyPlan, block_runs, copy_layer
from .cuda_ipc import open_handle
from .kv_paths import PATHS, host_id, sender_paths
from .kv_receiver import Reservation, ReserveSpec
from .nixl_path import NixlAgent, NixlLayerWriter
from .raw_frames import FRAME_BYTES, FrameHeader, encode_frame, write_call
from .shm import map_tensor, receive_descriptor
from .tcp_path import TcpLayerSender

log = logging.getLogger(__name__)


class LocalDecode(Protocol):
    """A decode servicer in this process: reached by method calls, not RPCs."""

    @property
    def pool(self) -> KVPool: ...

    async def reserve_local(self, spec: ReserveSpec) -> Reservation: ...

    async def commit_local(self, handoff: KVHandoff, adopted_blocks: list[int]) -> None: ...

    async def release_local(self, request_id: str) -> None: ...


LOCAL_DECODERS: dict[str, LocalDecode] = {}  # address -> decode servicer hosted by this process


class KVHandoffSink:
    """One request's handoff to one decode worker (see the module docstring)."""

    def __init__(self, sender: "KVSender", address: str, reservation: Reservation) -> None:
        self.sender = sender
        self.address = address
        self.reservation = reservation
        self._write: Callable[[int, list[int]], None] | None = None  # the data path's, set by the sender
        self._stop: Callable[[], None] | None = None  # the tcp path's: ends its sender thread
        self.started: float | None = None
        self.bytes = 0
        self.aborted = False  # set before the reservation is given back: no write may follow
        self.task: asyncio.Task | None = None  # the grpc path's sender
        self.finished = asyncio.get_running_loop().create_future()  # resolved by the data path
        # a data path that fails after the request already failed (nobody awaits `finish`) is no news
        self.finished.add_done_callback(lambda done: done.cancelled() or done.exception())

    @property
    def path(self) -> str:
        return self.reservation.path

    def write_layer(self, layer: int, block_table: list[int]) -> None:
        if self.aborted:
            return
        if self.started is None:
            self.started = time.perf_counter()
        if self._write is not None:
            self._write(layer, block_table)

    async def finish(self) -> None:
        await self.finished
        if self.started is not None and self.path != "inproc":
            metrics.TRANSFER_BYTES.labels("kv", self.path).inc(self.bytes)
            metrics.TRANSFER_LATENCY.labels("kv", self.path).observe(time.perf_counter() - self.started)

    async def commit(self, handoff: KVHandoff) -> None:
        local = self.sender.local_decode(self.address)
        if self.path == "inproc" and local is not None:
            await local.commit_local(handoff, handoff.block_table)
            return
        stub = pb_grpc.DecodeServiceStub(self.sender.channels.get(self.address))
        await stub.CommitKV(pb.CommitKVRequest(
            request_id=handoff.request_id, prompt_tokens=handoff.prompt_tokens, first_token=handoff.first_token,
            next_position=handoff.next_position, rope_delta=handoff.rope_delta,
            sampling=sampling_to_proto(handoff.sampling), generator_state=handoff.generator_state,
            cached_tokens=handoff.cached_tokens), timeout=self.sender.timeout)

    async def abort(self) -> None:
        """Give the reservation back (best effort: a dead decode worker has nothing to give back)."""
        self.aborted = True
        if self.task is not None:
            self.task.cancel()
        if self._stop is not None:
            self._stop()
        if not self.finished.done():
            self.finished.cancel()
        local = self.sender.local_decode(self.address)
        try:
            if local is not None:
                await local.release_local(self.reservation.request_id)
            else:
                stub = pb_grpc.DecodeServiceStub(self.sender.channels.get(self.address))
                await stub.ReleaseKV(pb.ReleaseKVRequest(request_id=self.reservation.request_id), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.info("could not release the KV reservation of %s at %s: %s", self.reservation.request_id,
                     self.address, exc.code().name)


@dataclass
class _Mapped:
    """Decode's pool as this process sees it (shared memory or CUDA IPC), kept per peer."""

    kv: torch.Tensor


class KVSender:
    def __init__(self, channels, pool: KVPool, timeout: float = 300.0,
                 allowed: frozenset[str] = frozenset(PATHS)) -> None:
        self.channels = channels
        self.pool = pool
        self.allowed = allowed
        self.timeout = timeout
        self._mapped: dict[str, _Mapped] = {}
        self._nixl: NixlAgent | None = None  # made on the first handoff over NIXL
        self._copy_stream = torch.cuda.Stream(pool.device) if pool.device.type == "cuda" else None

    @property
    def layout(self) -> KVLayout:
        return self.pool.layout

    async def open(self, address: str, request_id: str, prompt_tokens: int, max_tokens: int) -> KVHandoffSink:
        """Reserve at the decode worker (waits while it is full) and return the request's sink."""
        spec = ReserveSpec(request_id, prompt_tokens, max_tokens, host_id(),
                           sender_paths(self.pool.device.type, self.allowed), self.layout)
        local = self.local_decode(address)
        if local is not None:  # decode adopts the prefill blocks: nothing to move
            sink = KVHandoffSink(self, address, await local.reserve_local(spec))
            sink.finished.set_result(None)
            return sink
        stub = pb_grpc.DecodeServiceStub(self.channels.get(address))
        reply = await stub.ReserveKV(pb.ReserveKVRequest(
            request_id=request_id, prompt_tokens=prompt_tokens, max_tokens=max_tokens, sender_host=spec.sender_host,
            paths=spec.paths, layout=layout_to_proto(self.layout)), timeout=self.timeout)
        reservation = Reservation(request_id, reply.path, list(reply.block_ids), shm_socket=reply.shm_socket,
                                  cuda_ipc_handle=reply.cuda_ipc_handle, nixl_metadata=reply.nixl_metadata,
                                  tcp_port=reply.tcp_port, tcp_token=reply.tcp_token)
        sink = KVHandoffSink(self, address, reservation)
        mapped = await self._map(address, reservation)
        nixl = self._nixl_writer(address, reservation) if reservation.path == "nixl" else None
        connection = await self._connect(address, reservation) if reservation.path == "tcp" else None
        if mapped is not None:
            sink._write = self._direct_writer(sink, mapped)
        elif nixl is not None:
            sink._write = self._nixl_write(sink, nixl)
        elif connection is not None:
            sink._write = self._tcp_writer(sink, connection)
        else:
            reservation.path = "grpc"  # every decode worker takes raw frames
            sink._write = self._grpc_writer(sink)
        return sink

    # ---- nixl: RDMA writes into decode's registered pool --------------------------------
    def _nixl_writer(self, address: str, reservation: Reservation) -> NixlLayerWriter | None:
        try:
            if self._nixl is None:
                self._nixl = NixlAgent("prefill", self.pool.kv)
            return NixlLayerWriter(self._nixl, self._nixl.remote(reservation.nixl_metadata), reservation.blocks)
        except Exception as exc:  # no UCX transport to that peer, a broken agent: the universal path serves
            log.warning("cannot write to %s over NIXL (%s); using grpc", address, exc)
            return None

    def _nixl_write(self, sink: KVHandoffSink, writer: NixlLayerWriter) -> Callable[[int, list[int]], None]:
        layers = self.layout.num_layers
        loop = asyncio.get_running_loop()

        def write(layer: int, table: list[int]) -> None:
            writer.write(layer, table)
            sink.bytes = writer.bytes
            if layer == layers - 1:
                loop.call_soon_threadsafe(self._settle, sink, writer.wait)

        return write

    def local_decode(self, address: str) -> LocalDecode | None:
        """The decode servicer at `address` if it runs in this process over this very pool."""
        local = LOCAL_DECODERS.get(address) if "inproc" in self.allowed else None
        return local if local is not None and local.pool is self.pool else None

    # ---- shm / cuda_ipc: straight into decode's pool ----------------------------------
    async def _map(self, address: str, reservation: Reservation) -> _Mapped | None:
        if reservation.path not in ("shm", "cuda_ipc"):
            return None
        key = f"{address}/{reservation.path}"
        if key not in self._mapped:
            try:
                if reservation.path == "cuda_ipc":
                    kv = open_handle(reservation.cuda_ipc_handle)
                else:
                    fd = await asyncio.to_thread(receive_descriptor, reservation.shm_socket)
                    try:
                        kv = map_tensor(fd, self._pool_shape(fd), self.layout.dtype)
                    finally:
                        os.close(fd)  # the mapping keeps the memory; the descriptor is not needed
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("cannot map the KV pool of %s over %s (%s); using grpc", address, reservation.path, exc)
                return None
            self._mapped[key] = _Mapped(kv)
        return self._mapped[key]

    def _pool_shape(self, fd: int) -> tuple[int, ...]:
        layout = self.layout
        blocks = os.fstat(fd).st_size // layout.bytes_per_block
        return (layout.num_layers, 2, blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)

    def _direct_writer(self, sink: KVHandoffSink, mapped: _Mapped) -> Callable[[int, list[int]], None]:
        layers = self.layout.num_layers
        plans: list[BlockCopyPlan] = []  # made at the first layer, when the prompt's blocks are known
        loop = asyncio.get_running_loop()

        def write(layer: int, table: list[int]) -> None:
            if not plans:
                plans.append(BlockCopyPlan.between(table[:len(sink.reservation.blocks)], sink.reservation.blocks,
                                                   self.pool.device))
            if self._copy_stream is not None:  # after this layer's kernels, beside the next layer's
                self._copy_stream.wait_stream(torch.cuda.current_stream(self.pool.device))
                with torch.cuda.stream(self._copy_stream):
                    sink.bytes += copy_layer(self.pool.kv, mapped.kv, layer, plans[0])
            else:
                sink.bytes += copy_layer(self.pool.kv, mapped.kv, layer, plans[0])
            if layer == layers - 1:
                done = self._copy_stream.synchronize if self._copy_stream is not None else None
                loop.call_soon_threadsafe(self._settle, sink, done)

        return write

    @staticmethod
    def _settle(sink: KVHandoffSink, wait: Callable[[], None] | None) -> None:
        async def settle() -> None:
            try:
                if wait is not None:
                    await asyncio.to_thread(wait)
            except Exception as exc:  # the data path failed: the handoff does too
                if not sink.finished.done():
                    sink.finished.set_exception(exc)
                return
            if not sink.finished.done():
                sink.finished.set_result(None)
        spawn(settle())

    # ---- tcp: a sender thread writes into decode's reserved blocks ------------------------
    async def _connect(self, address: str, reservation: Reservation) -> socket.socket | None:
        try:
            return await asyncio.to_thread(TcpLayerSender.connect, address, reservation.tcp_port, self.channels.tls)
        except OSError as exc:  # a port this host cannot reach (a NetworkPolicy, a firewall): grpc serves
            log.warning("cannot reach the tcp KV listener of %s on port %d (%s); using grpc", address,
                        reservation.tcp_port, exc)
            return None

    def _tcp_writer(self, sink: KVHandoffSink, connection) -> Callable[[int, list[int]], None]:
        loop = asyncio.get_running_loop()
        reservation = sink.reservation

        def settle(error: BaseException | None) -> None:  # on the loop, once decode acknowledged (or not)
            sink.bytes = sender.sent
            if sink.finished.done():
                return
            if error is None:
                sink.finished.set_result(None)
            else:
                sink.finished.set_exception(ConnectionError(f"KV over tcp to {sink.address} failed: {error}"))

        def settle_soon(error: BaseException | None) -> None:  # on the sender's thread
            loop.call_soon_threadsafe(settle, error)

        sender = TcpLayerSender(connection, self.pool.kv, self.layout.num_layers, reservation.request_id, reservation.tcp_token,
                                len(reservation.blocks), settle_soon)
        sink._stop = sender.stop
        return sender.write

    # ---- grpc: raw frames from a sender task -------------------------------------------
    def _grpc_writer(self, sink: KVHandoffSink) -> Callable[[int, list[int]], None]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()
        sink.task = asyncio.ensure_future(self._stream(sink, ready))
        sink.task.add_done_callback(lambda t: _resolve(sink.finished, t))

        def write(layer: int, table: list[int]) -> None:
            loop.call_soon_threadsafe(ready.put_nowait, (layer, table))

        return write

    async def _stream(self, sink: KVHandoffSink, ready: asyncio.Queue[tuple[int, list[int]]]) -> None:
        reservation = sink.reservation

        async def frames() -> AsyncIterator[bytes]:
            for _ in range(self.layout.num_layers):
                layer, table = await ready.get()
                for frame in await asyncio.to_thread(self._layer_frames, reservation, layer, table):
                    sink.bytes += len(frame)
                    yield frame

        await write_call(self.channels.get(sink.address))(frames(), timeout=self.timeout)

    def _layer_frames(self, reservation: Reservation, layer: int, table: list[int]) -> list[bytes]:
        """The layer's keys and values as frames; runs of consecutive source blocks go out as views of the
        pool (the frame's join is the only copy; a GPU pool is copied to host first)."""
        count = len(reservation.blocks)
        block_bytes = self.layout.bytes_per_block // (2 * self.layout.num_layers)
        per_frame = max(1, FRAME_BYTES // block_bytes)
        frames = []
        for plane in range(2):
            first = 0
            for start, _, length in block_runs(table[:count], table[:count]):
                for offset in range(0, length, per_frame):
                    blocks = min(per_frame, length - offset)
                    part = self.pool.kv[layer, plane, start + offset:start + offset + blocks].cpu()
                    header = FrameHeader(reservation.request_id, layer, plane, first, blocks)
                    frames.append(encode_frame(header, part.view(torch.uint8).numpy().data))
                    first += blocks
        return frames


def _resolve(future: asyncio.Future, task: asyncio.Task) -> None:
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(None)

