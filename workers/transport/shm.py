"""Shared memory between processes of one host, with nothing to leak.

Memory comes from `memfd_create`: an anonymous file that has no name under
/dev/shm, so no segment outlives its last user, however the processes die. A
peer gets the file descriptor itself over a Unix domain socket (SCM_RIGHTS)
and maps it; the kernel frees the memory when the last mapping and descriptor
are gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import tempfile
import uuid

import torch

log = logging.getLogger(__name__)


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype, name: str = "epd") -> tuple[torch.Tensor, int]:
    """A tensor in fresh shared memory and the memory file's descriptor (owned by the caller)."""
    size = dtype.itemsize
    for dim in shape:
        size *= dim
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, max(size, 1))
    return map_tensor(fd, shape, dtype), fd


def map_tensor(fd: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Map a memory file descriptor as a tensor of `shape` (the mapping lives as long as the tensor)."""
    size = max(os.fstat(fd).st_size, 1)
    mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    flat = torch.frombuffer(mapped, dtype=torch.uint8)
    expected = dtype.itemsize
    for dim in shape:
        expected *= dim
    if flat.numel() < expected:
        raise ValueError(f"shared memory of {flat.numel()} bytes is smaller than {shape} {dtype}")
    return flat[:expected].view(dtype).view(shape)


class SharedPool:
    """An allocator for one shared tensor (a KV pool) that remembers its memory file descriptor."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor, self.fd = shared_tensor(shape, dtype, "epd-kv-pool")
        return tensor


class DescriptorServer:
    """Hands one memory file descriptor to every local peer that connects to its Unix socket."""

    def __init__(self, fd: int, directory: str | None = None) -> None:
        self.fd = fd
        self.path = os.path.join(directory or tempfile.gettempdir(), f"epd-{uuid.uuid4().hex[:16]}.sock")
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)  # only this user's processes may map the pool

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio hands out a wrapper; send_fds needs a real socket (a duplicate, closed after use)
        with socket.fromfd(writer.get_extra_info("socket").fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                socket.send_fds(sock, [b"fd"], [self.fd])
            except OSError as exc:
                log.warning("could not hand the shared pool to a peer: %s", exc)
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def receive_descriptor(path: str, timeout: float = 5.0) -> int:
    """The memory file descriptor served at `path` (raises OSError when unreachable: not this host)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    if not fds:
        raise OSError(f"no descriptor received from {path}")
    return fds[0]
