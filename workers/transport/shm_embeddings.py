"""Embeddings from an encode worker to a prefill worker on the same host, in
shared memory: the encode side writes each embedding into a fresh memory file
(`memfd`, so nothing can leak under /dev/shm) and sends the descriptors, with
a small JSON header naming each item's key, shape and dtype, in one message
over the prefill worker's Unix socket. Prefill maps them as they are (no
copy), checks every item before it stores any, and answers `ok` or the
reason it refused them.

The socket is a SOCK_SEQPACKET one, so a message and its descriptors arrive
whole or not at all; it is mode 0600, so only this user's processes can push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Callable

import torch

from ..background import spawn
from ..timeouts import within
from .shm import map_tensor, shared_tensor

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 << 10
MAX_ITEMS = 64  # descriptors per message (the kernel allows 253)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OK = b"ok"

# takes a whole push, [(item key, tensor)]: raises ValueError (and stores nothing) if any item is not valid
Take = Callable[[list[tuple[str, torch.Tensor]]], None]


class EmbeddingRejected(RuntimeError):
    """The prefill worker refused a push (an embedding that does not fit its model)."""


def send_embeddings(path: str, embeddings: dict[str, torch.Tensor], timeout: float) -> int:
    """Push `embeddings` to the mailbox at `path`; the bytes sent. OSError when it cannot be reached
    (the caller falls back to gRPC); EmbeddingRejected when prefill refuses them. Blocking: run it off
    the event loop."""
    if len(embeddings) > MAX_ITEMS:
        raise ValueError(f"{len(embeddings)} embeddings in one push exceed {MAX_ITEMS}")
    fds: list[int] = []
    items = []
    try:
        for key, tensor in embeddings.items():
            shared, fd = shared_tensor(tuple(tensor.shape), tensor.dtype, "epd-embedding")
            fds.append(fd)
            shared.copy_(tensor)  # the one copy; the mapping goes with `shared`
            items.append({"key": key, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")})
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            socket.send_fds(sock, [json.dumps({"items": items}).encode()], fds)
            reply = sock.recv(4096)
    finally:
        for fd in fds:
            os.close(fd)
    if not reply:
        raise ConnectionResetError(f"the prefill worker at {path} closed the connection without an answer")
    if reply != OK:
        raise EmbeddingRejected(reply.decode(errors="replace"))
    return sum(t.nbytes for t in embeddings.values())


class EmbeddingMailbox:
    """Prefill side: a Unix socket that takes pushed embeddings and hands each push to `take`."""

    def __init__(self, take: Take, directory: str | None = None, timeout: float = 10.0) -> None:
        self.take = take
        self.timeout = timeout
        self.path = os.path.join(directory or tempfile.gettempdir(), f"epd-emb-{uuid.uuid4().hex[:16]}.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o600)  # only this user's processes may push
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._accepting: asyncio.Task | None = None

    def start(self) -> None:
        self._accepting = spawn(self._accept())

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self._listener)
            spawn(self._serve(connection))

    async def _serve(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with connection:
            connection.setblocking(False)
            try:
                message, fds = await within(_receive(connection), self.timeout)
            except (OSError, asyncio.TimeoutError) as exc:  # the sender died or stalled: nothing was stored
                log.debug("embedding push broke off: %r", exc)
                return
            if not message:  # connected and left without a word (any descriptors with it are closed)
                _close(fds)
                return
            reply = self._take(message, fds)
            with contextlib.suppress(OSError):  # a sender gone by now learns nothing; its items are stored
                await loop.sock_sendall(connection, reply)

    def _take(self, message: bytes, fds: list[int]) -> bytes:
        """Map every descriptor, hand the whole push to `take`; always closes the descriptors."""
        try:
            items = json.loads(message)["items"]
            if not isinstance(items, list) or len(items) != len(fds):
                raise ValueError(f"{len(fds)} descriptors for {len(items) if isinstance(items, list) else 0} items")
            self.take([(str(item["key"]), _mapped(fd, item)) for item, fd in zip(items, fds, strict=True)])
            return OK
        except (ValueError, KeyError, TypeError, OSError) as exc:  # JSONDecodeError is a ValueError
            log.warning("refused an embedding push: %s", exc)
            return f"refused: {exc}".encode()
        finally:
            _close(fds)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _mapped(fd: int, item: dict) -> torch.Tensor:
    dtype = DTYPES.get(item["dtype"])
    shape = tuple(int(d) for d in item["shape"])
    if dtype is None:
        raise ValueError(f"embedding dtype {item['dtype']!r} is not one of {', '.join(DTYPES)}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"embedding shape {list(shape)} is not [rows, hidden]")
    return map_tensor(fd, shape, dtype)


async def _receive(connection: socket.socket) -> tuple[bytes, list[int]]:
    """One message and its descriptors (a message cut short by the buffers is refused whole)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            message, fds, flags, _ = socket.recv_fds(connection, MAX_HEADER_BYTES, MAX_ITEMS)
        except BlockingIOError:
            await _readable(loop, connection)
            continue
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close(fds)
            raise OSError("an embedding push larger than the mailbox takes")
        return message, fds


async def _readable(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():  # the reader may fire again before it is removed
            ready.set_result(None)
    loop.add_reader(connection.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(connection.fileno())
