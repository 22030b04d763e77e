"""Decode side of the KV handoff: reserve blocks in the decode engine first
(waiting while the pool or the batch is full: back-pressure on prefill), then
let the KV land in them over the path chosen for the pair, then commit.

A reservation whose KV never commits (the sender died, gave up) is released
after `lease` seconds; a raw stream that breaks releases its reservation at
once. Nothing stays held when a peer dies."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import torch

from .. import metrics
from ..background import spawn
from ..engine import DecodeEngine
from ..engine.kv_pool import KVLayout
from ..security.tls import TLSFiles
from ..timeouts import within
from .block_copy import block_runs
from .kv_paths import PATHS, choose_path, host_id
from .nixl_path import NixlAgent
from .raw_frames import decode_frame
from .shm import DescriptorServer
from .tcp_path import IDLE_SECONDS, TOKEN_BYTES, TcpKVListener, TcpReceipt

log = logging.getLogger(__name__)

# Paths on which the sender writes into this pool itself: this side cannot stop a write on its way, so
# a reservation on them is only freed once the sender says its writes are over (or its lease runs out).
SENDER_WRITES = frozenset({"shm", "cuda_ipc", "nixl"})

Compute = Callable[..., Awaitable[Any]]  # runs engine work on the worker's compute thread


class ReservationTimeout(Exception):
    """The decode worker stayed full for the whole reservation wait."""


@dataclass(frozen=True)
class ReserveSpec:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    sender_host: str
    paths: list[str]
    layout: KVLayout


@dataclass
class Reservation:
    request_id: str
    path: str
    blocks: list[int]  # decode pool blocks, in token order (empty when in-process blocks are adopted)
    created: float = 0.0
    shm_socket: str = ""
    cuda_ipc_handle: bytes = b""
    nixl_metadata: bytes = b""
    tcp_port: int = 0
    tcp_token: bytes = b""  # the one-time secret a tcp connection must present for these blocks
    tcp: TcpReceipt | None = None  # decode's side of a tcp handoff
    writing: asyncio.Future | None = None  # a grpc frame being copied into the blocks (on a helper thread)
    cancelled: bool = False  # the client left: kept until its sender gives it back (see `KVReceiver.cancel`)


@dataclass(frozen=True)
class TcpEndpoint:
    """Where a decode worker listens for KV over tcp (port 0: any free port)."""

    host: str
    port: int = 0
    tls: TLSFiles | None = None


class KVReceiver:
    def __init__(self, engine: DecodeEngine, compute: Compute, wait: float = 60.0, lease: float = 60.0,
                 shared_fd: int | None = None, cuda_ipc_handle: bytes = b"",
                 clock: Callable[[], float] = time.monotonic, allowed: frozenset[str] = frozenset(PATHS),
                 nixl: NixlAgent | None = None, tcp: TcpEndpoint | None = None) -> None:
        self.engine = engine
        self.nixl = nixl
        self.clock = clock
        self.compute = compute
        self.wait = wait
        self.lease = lease
        self.reservations: dict[str, Reservation] = {}
        self.capacity = asyncio.Event()  # set whenever blocks or batch slots may have freed
        self.shm = DescriptorServer(shared_fd) if shared_fd is not None else None
        self.cuda_ipc_handle = cuda_ipc_handle
        self.tcp = TcpKVListener(tcp.host, tcp.port, lambda: self.engine.pool.kv, self._admit_tcp, self._tcp_broke,
                                 tcp.tls) if tcp is not None and "tcp" in allowed else None
        self._tcp_lock = threading.Lock()  # a tcp connection's admission against its reservation's release
        self._loop: asyncio.AbstractEventLoop | None = None
        offered = {"inproc", "grpc"} | ({"shm"} if self.shm else set()) \
            | ({"cuda_ipc"} if cuda_ipc_handle else set()) | ({"nixl"} if nixl is not None else set()) \
            | ({"tcp"} if self.tcp else set())
        self.offered = offered & allowed

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.shm is not None:
            await self.shm.start()
        if self.tcp is not None:
            self.tcp.start()

    async def stop(self) -> None:
        if self.shm is not None:
            await self.shm.stop()
        if self.tcp is not None:
            self.tcp.stop()

    @property
    def layout(self) -> KVLayout:
        return self.engine.pool.layout

    def capacity_changed(self) -> None:
        self.capacity.set()

    # ---- reservations -------------------------------------------------------------
    async def reserve(self, spec: ReserveSpec, local: bool = False) -> Reservation:
        """Blocks for the handoff (raises SequenceTooLong if it can never fit, ValueError for a foreign
        KV layout, ReservationTimeout if the worker stays full for `wait` seconds)."""
        if spec.layout != self.layout:
            raise ValueError(f"request {spec.request_id}: the sender's KV layout {spec.layout} is not this "
                             f"worker's {self.layout} (a different model or block size)")
        path = "inproc" if local else choose_path(self.offered - {"inproc"}, spec.paths, spec.sender_host == host_id())
        deadline = time.monotonic() + self.wait
        while True:
            self.capacity.clear()
            granting = asyncio.ensure_future(self.compute(self.engine.reserve, spec.request_id, spec.prompt_tokens,
                                                          spec.max_tokens, path == "inproc"))
            try:
                blocks = await asyncio.shield(granting)
            except asyncio.CancelledError:  # the sender left while the compute thread may be granting blocks
                spawn(self._give_back_if_granted(granting, spec.request_id))
                raise
            if blocks is not None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReservationTimeout(f"request {spec.request_id}: the decode worker stayed full for "
                                         f"{self.wait:.0f}s")
            try:
                await within(self.capacity.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass  # re-check: a reservation may also have expired
            await self.expire()
        reservation = Reservation(spec.request_id, path, blocks, self.clock(),
                                  shm_socket=self.shm.path if path == "shm" and self.shm else "",
                                  cuda_ipc_handle=self.cuda_ipc_handle if path == "cuda_ipc" else b"",
                                  nixl_metadata=self.nixl.metadata() if path == "nixl" and self.nixl else b"")
        if path == "tcp" and self.tcp is not None:
            reservation.tcp_port, reservation.tcp_token = self.tcp.port, secrets.token_bytes(TOKEN_BYTES)
            reservation.tcp = TcpReceipt(partial(self._frame_blocks, reservation))
        self.reservations[spec.request_id] = reservation
        return reservation

    async def _give_back_if_granted(self, granting: asyncio.Future, request_id: str) -> None:
        """Blocks the engine granted to a sender that had left: nobody would ever release them."""
        if await granting is not None:
            await self.compute(self.engine.release, request_id)
            self.capacity_changed()

    def take(self, request_id: str) -> Reservation | None:
        """The reservation, handed to its commit."""
        return self.reservations.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        """The client left. A reservation the sender writes into (`SENDER_WRITES`) stays until the sender
        gives it back after its last write, commits (the commit is refused, the blocks freed) or its lease
        ends: freed now, a write still on its way could land in blocks given to another sequence meanwhile.
        Any other reservation is released now."""
        reservation = self.reservations.get(request_id)
        if reservation is not None and reservation.path in SENDER_WRITES:
            reservation.cancelled = True
        elif reservation is not None:
            await self.release(request_id)

    async def release(self, request_id: str) -> bool:
        with self._tcp_lock:
            reservation = self.reservations.pop(request_id, None)
        if reservation is None:
            return False
        receipt = reservation.tcp
        if receipt is not None and receipt.connection is not None:  # nothing may land in the freed blocks
            receipt.stop()
            await asyncio.to_thread(receipt.done.wait, IDLE_SECONDS)
        if reservation.writing is not None:  # nor the rest of a grpc frame's copy
            await asyncio.wait([reservation.writing])
        await self.compute(self.engine.release, request_id)
        self.capacity_changed()
        return True

    async def expire(self) -> None:
        """Release reservations whose KV never committed within the lease (their sender is gone)."""
        cutoff = self.clock() - self.lease
        for request_id in [r for r, res in self.reservations.items() if res.created < cutoff]:
            log.warning("releasing the KV reservation of %s: nothing committed within %.0fs", request_id,
                        self.lease)
            await self.release(request_id)

    def _frame_blocks(self, reservation: Reservation, layer: int, first: int, count: int) -> list[int]:
        """The pool blocks a frame of one layer fills (ValueError when it falls outside the reservation)."""
        if not 0 <= layer < self.layout.num_layers or first < 0 or count < 0 or first + count > len(reservation.blocks):
            raise ValueError(f"KV frame for layer {layer}, blocks {first}..{first + count} is outside "
                             f"the reservation of {len(reservation.blocks)} blocks")
        return reservation.blocks[first:first + count]

    # ---- the tcp data path (see tcp_path): called on the listener's threads ---------------
    def _admit_tcp(self, request_id: str, token: bytes, connection: socket.socket) -> TcpReceipt | None:
        with self._tcp_lock:
            reservation = self.reservations.get(request_id)
            receipt = reservation.tcp if reservation is not None else None
            if reservation is None or receipt is None or receipt.connection is not None \
                    or not hmac.compare_digest(reservation.tcp_token, token):
                return None
            receipt.connection = connection
            return receipt

    def _tcp_broke(self, request_id: str) -> None:
        if self._loop is not None:  # the sender went away mid-transfer: its reservation is of no use
            self._loop.call_soon_threadsafe(lambda: spawn(self.release(request_id)))

    # ---- the grpc data path: raw frames written into the reserved blocks ------------
    async def write_stream(self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        request_id = ""
        received = 0
        start = time.perf_counter()
        try:
            async for frame in frames:
                header, payload = decode_frame(frame)
                request_id = header.request_id
                reservation = self.reservations.get(request_id)
                if reservation is None or reservation.path == "inproc":  # grpc is every sender's fallback
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"no KV reservation for request {request_id!r}")
                # shielded: a copy that has started runs to its end, and a release waits for it
                reservation.writing = asyncio.get_running_loop().run_in_executor(
                    None, self._write_frame, reservation, header.layer, header.plane, header.first_block,
                    header.blocks, payload)
                received += await asyncio.shield(reservation.writing)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            if request_id:  # the sender went away mid-transfer: its reservation is of no use
                await self.release(request_id)
            raise
        metrics.TRANSFER_BYTES.labels("kv", "grpc").inc(received)
        metrics.TRANSFER_LATENCY.labels("kv", "grpc").observe(time.perf_counter() - start)
        return b"%d" % received

    def _write_frame(self, reservation: Reservation, layer: int, plane: int, first: int, count: int,
                     payload: memoryview) -> int:
        layout = self.layout
        targets = self._frame_blocks(reservation, layer, first, count)
        pool = self.engine.pool.kv
        expected = count * layout.bytes_per_block // (2 * layout.num_layers)  # keys or values of one layer
        if payload.nbytes != expected:
            raise ValueError(f"KV frame of {payload.nbytes} bytes, expected {expected}")
        with warnings.catch_warnings():  # read-only bytes: the view is only read from
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(payload, dtype=torch.uint8)
        data = raw.view(layout.dtype).view(count, *pool.shape[3:])
        for src, dst, length in block_runs(list(range(count)), targets):
            pool[layer, plane, dst:dst + length].copy_(data[src:src + length])
        return payload.nbytes
