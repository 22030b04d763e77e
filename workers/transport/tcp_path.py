"""KV across hosts over one TCP connection per handoff, at the socket's speed.

Prefill sends views of its pool's blocks (`sendall`) and decode receives
straight into the reserved blocks of its pool (`recv_into`): user space copies
nothing, where a gRPC frame is copied four times between the two pools. The
connection opens with the reservation's request id and a one-time token that
decode handed out over the authenticated gRPC control path (`ReserveKV`), so
only the reserving sender can write into those blocks; with mutual TLS
configured, the connection is TLS with the same certificates.

The stream: hello, then frames (header + the blocks of one layer's keys or
values for a run of consecutive source blocks), then an end frame; decode
answers with the number of bytes it wrote, and only then does prefill commit.
Each side runs the connection on a thread of its own (blocking socket calls
release the GIL)."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import metrics
from ..security.tls import TLSFiles
from .block_copy import block_runs

log = logging.getLogger(__name__)

MAGIC = b"EPT1"
TOKEN_BYTES = 16
_HELLO = struct.Struct("<4sH16s")  # magic, request id length, token; the request id follows
_FRAME = struct.Struct("<HBII")  # layer, plane (0 keys, 1 values), first block (index into the reservation), blocks
_ACK = struct.Struct("<Q")  # bytes decode wrote into its pool
END_LAYER = 0xFFFF
IDLE_SECONDS = 60.0  # a connection silent this long is broken (its sender is gone)


FrameCheck = Callable[[int, int, int], list[int]]  # (layer, first, blocks) -> the pool blocks the frame fills


@dataclass
class TcpReceipt:
    """Decode's side of one tcp handoff: how its frames map to pool blocks (ValueError for one outside
    the reservation), and the connection writing them, so that a release can stop it and wait until
    nothing more is written into the blocks it frees."""

    check: FrameCheck
    connection: socket.socket | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        connection = self.connection
        if connection is not None:
            try:
                connection.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv at once
            except OSError:
                pass


def split_address(address: str) -> str:
    """The host part of a `host:port` gRPC address (IPv6 brackets removed)."""
    host = address.rpartition(":")[0] or address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    array: Any = tensor.view(torch.uint8).numpy()  # numpy's stubs do not declare the buffer protocol
    return memoryview(array).cast("B")


def _recv_exact(connection: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    _recv_into(connection, memoryview(buffer))
    return bytes(buffer)


def _recv_into(connection: socket.socket, target: memoryview) -> None:
    # plain sockets wait in the kernel for the whole frame (one call, not one per segment); TLS takes no flags
    flags = 0 if isinstance(connection, ssl.SSLSocket) else socket.MSG_WAITALL
    filled = 0
    while filled < len(target):
        got = connection.recv_into(target[filled:], 0, flags)
        if got == 0:
            raise ConnectionError("the KV sender closed the connection mid-transfer")
        filled += got


def _tune(connection: socket.socket) -> None:
    # the end frame goes out at once; buffer sizes are left to the kernel (setting them turns autotuning off)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpKVListener:
    """Decode's listener: one thread accepts, one thread per connection writes into the pool.

    `admit(request_id, token, connection)` ties the connection to its reservation and returns the
    reservation's receipt, or None for a wrong id or token; `broken(request_id)` is told of a
    connection that failed mid-transfer (its reservation is of no use)."""

    def __init__(self, host: str, port: int, kv: Callable[[], torch.Tensor],
                 admit: Callable[[str, bytes, socket.socket], TcpReceipt | None],
                 broken: Callable[[str], None], tls: TLSFiles | None = None) -> None:
        self.kv = kv
        self.admit = admit
        self.broken = broken
        self.tls = tls
        self._socket = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="kv-tcp-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        except OSError:
            pass
        self._socket.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(connection,), name="kv-tcp-receive", daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        request_id, receipt = "", None
        connection = raw
        try:
            _tune(raw)
            raw.settimeout(IDLE_SECONDS)
            if self.tls is not None:
                connection = self.tls.ssl_context(server=True).wrap_socket(raw, server_side=True)
            magic, id_length, token = _HELLO.unpack(_recv_exact(connection, _HELLO.size))
            if magic != MAGIC:
                raise ValueError("not a KV connection (bad magic)")
            request_id = _recv_exact(connection, id_length).decode(errors="replace")
            receipt = self.admit(request_id, token, connection)
            if receipt is None:
                raise PermissionError(f"no tcp KV reservation for request {request_id!r} with that token")
            received = 0
            while True:
                layer, plane, first, count = _FRAME.unpack(_recv_exact(connection, _FRAME.size))
                if layer == END_LAYER:
                    break
                if plane > 1:
                    raise ValueError(f"KV frame with plane {plane}")
                received += self._receive(connection, layer, plane, receipt.check(layer, first, count))
            connection.sendall(_ACK.pack(received))
            metrics.TRANSFER_BYTES.labels("kv", "tcp").inc(received)
        except (OSError, ValueError, PermissionError, ssl.SSLError) as exc:
            log.warning("KV over tcp for request %r failed: %s", request_id, exc)
            if receipt is not None:
                self.broken(request_id)
        finally:
            connection.close()
            if receipt is not None:
                receipt.connection = None
                receipt.done.set()

    def _receive(self, connection: socket.socket, layer: int, plane: int, targets: list[int]) -> int:
        kv = self.kv()
        received = 0
        for _, start, length in block_runs(targets, targets):
            target = kv[layer, plane, start:start + length]
            # a socket cannot write device memory: a GPU pool receives through host memory
            landing = torch.empty_like(target, device="cpu") if target.is_cuda else target
            view = tensor_bytes(landing)
            _recv_into(connection, view)
            if landing is not target:
                target.copy_(landing)
            received += len(view)
        return received


class TcpLayerSender:
    """Prefill's side of one handoff: a thread that sends each layer as the engine finishes it.

    `done(error)` is called once, from that thread, when decode has acknowledged every byte (error
    None) or the transfer failed."""

    def __init__(self, connection: socket.socket, kv: torch.Tensor, layers: int, request_id: str,
                 token: bytes, blocks: int, done: Callable[[BaseException | None], None]) -> None:
        self.connection = connection
        self.kv = kv
        self.layers = layers
        self.blocks = blocks
        self.done = done
        self.sent = 0
        self._layers: queue.SimpleQueue[tuple[int, list[int]] | None] = queue.SimpleQueue()
        rid = request_id.encode()
        self._hello = _HELLO.pack(MAGIC, len(rid), token) + rid
        threading.Thread(target=self._run, name="kv-tcp-send", daemon=True).start()

    @staticmethod
    def connect(address: str, port: int, tls: TLSFiles | None, timeout: float = 10.0) -> socket.socket:
        """A connection to decode's listener (OSError when it cannot be reached)."""
        host = split_address(address)
        raw = socket.create_connection((host, port), timeout=timeout)
        _tune(raw)
        raw.settimeout(IDLE_SECONDS)
        if tls is None:
            return raw
        return tls.ssl_context(server=False).wrap_socket(raw, server_hostname=host)

    def write(self, layer: int, table: list[int]) -> None:
        self._layers.put((layer, table))

    def stop(self) -> None:
        """Abort: the thread ends at its next socket call or layer."""
        self._layers.put(None)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self.connection.sendall(self._hello)
            for _ in range(self.layers):
                item = self._layers.get(timeout=IDLE_SECONDS)
                if item is None:
                    raise ConnectionAbortedError("the KV handoff was aborted")
                self._send_layer(*item)
            self.connection.sendall(_FRAME.pack(END_LAYER, 0, 0, 0))
            (written,) = _ACK.unpack(_recv_exact(self.connection, _ACK.size))
            if written != self.sent:
                raise ConnectionError(f"decode wrote {written} of {self.sent} KV bytes")
        except (OSError, ValueError, queue.Empty, ssl.SSLError) as exc:
            error = exc if not isinstance(exc, queue.Empty) else TimeoutError("no KV layer came from the engine")
        finally:
            self.connection.close()
        self.done(error)

    def _send_layer(self, layer: int, table: list[int]) -> None:
        sources = table[:self.blocks]
        for plane in range(2):
            first = 0
            for start, _, length in block_runs(sources, sources):
                self.connection.sendall(_FRAME.pack(layer, plane, first, length))
                payload = tensor_bytes(self.kv[layer, plane, start:start + length].cpu())  # a GPU pool via host
                self.connection.sendall(payload)
                self.sent += len(payload)
                first += length
