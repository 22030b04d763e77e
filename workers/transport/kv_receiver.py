"""Decode side of the KV handoff: reserve blocks in the decode engine first
(waiting while the pool or the batch is full: back-pressure on prefill), then
let the KV land in them over the path chosen for the pair, then commit.

A reservation whose KV never commits (the sender died, gave up) is released
after `lease` seconds; a raw stream that breaks releases its reservation at
once. Nothing stays held when a peer dies."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from .. import metrics
from ..engine import DecodeEngine
from ..engine.kv_pool import KVLayout
from .block_copy import block_runs
from .kv_paths import PATHS, choose_path, host_id
from .nixl_path import NixlAgent
from .raw_frames import decode_frame
from .shm import DescriptorServer

log = logging.getLogger(__name__)

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


class KVReceiver:
    def __init__(self, engine: DecodeEngine, compute: Compute, wait: float = 60.0, lease: float = 60.0,
                 shared_fd: int | None = None, cuda_ipc_handle: bytes = b"",
                 clock: Callable[[], float] = time.monotonic, allowed: frozenset[str] = frozenset(PATHS),
                 nixl: NixlAgent | None = None) -> None:
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
        offered = {"inproc", "grpc"} | ({"shm"} if self.shm else set()) \
            | ({"cuda_ipc"} if cuda_ipc_handle else set()) | ({"nixl"} if nixl is not None else set())
        self.offered = offered & allowed

    async def start(self) -> None:
        if self.shm is not None:
            await self.shm.start()

    async def stop(self) -> None:
        if self.shm is not None:
            await self.shm.stop()

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
            blocks = await self.compute(self.engine.reserve, spec.request_id, spec.prompt_tokens, spec.max_tokens,
                                        path == "inproc")
            if blocks is not None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReservationTimeout(f"request {spec.request_id}: the decode worker stayed full for "
                                         f"{self.wait:.0f}s")
            try:
                await asyncio.wait_for(self.capacity.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass  # re-check: a reservation may also have expired
            await self.expire()
        reservation = Reservation(spec.request_id, path, blocks, self.clock(),
                                  shm_socket=self.shm.path if path == "shm" and self.shm else "",
                                  cuda_ipc_handle=self.cuda_ipc_handle if path == "cuda_ipc" else b"",
                                  nixl_metadata=self.nixl.metadata() if path == "nixl" and self.nixl else b"")
        self.reservations[spec.request_id] = reservation
        return reservation

    def take(self, request_id: str) -> Reservation | None:
        """The reservation, handed to its commit."""
        return self.reservations.pop(request_id, None)

    async def release(self, request_id: str) -> bool:
        reservation = self.reservations.pop(request_id, None)
        if reservation is None:
            return False
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
                received += await asyncio.to_thread(self._write_frame, reservation, header.layer, header.plane,
                                                    header.first_block, header.blocks, payload)
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
        if not 0 <= layer < layout.num_layers or first < 0 or first + count > len(reservation.blocks):
            raise ValueError(f"KV frame for layer {layer}, blocks {first}..{first + count} is outside "
                             f"the reservation of {len(reservation.blocks)} blocks")
        pool = self.engine.pool.kv
        expected = count * layout.bytes_per_block // (2 * layout.num_layers)  # keys or values of one layer
        if payload.nbytes != expected:
            raise ValueError(f"KV frame of {payload.nbytes} bytes, expected {expected}")
        with warnings.catch_warnings():  # read-only bytes: the view is only read from
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(payload, dtype=torch.uint8)
        data = raw.view(layout.dtype).view(count, *pool.shape[3:])
        for src, dst, length in block_runs(list(range(count)), reservation.blocks[first:first + count]):
            pool[layer, plane, dst:dst + length].copy_(data[src:src + length])
        return payload.nbytes
