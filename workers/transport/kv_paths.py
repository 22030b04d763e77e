"""The KV data paths and how a pair of workers picks one.

`inproc`: prefill and decode in one process share the pool; decode adopts the
prefill blocks, nothing moves. `shm`: the same host; decode's pool lives in
shared memory that prefill maps and writes into. `cuda_ipc`: the same host and
a GPU; prefill writes into decode's pool through a CUDA IPC handle. `nixl`:
RDMA between hosts where the nixl package is importable on both ends. `tcp`:
a plain TCP connection per handoff from prefill's pool into decode's reserved
blocks (`tcp_path`), anywhere a decode worker listens for it. `grpc`: raw
byte frames over the gRPC connection, anywhere. Decode picks the best path
that both ends support; a sender that cannot use it (no shared socket
directory, a port it cannot reach) falls back to grpc, which every decode
worker serves."""

from __future__ import annotations

import importlib.util
import socket
from functools import cache
from pathlib import Path

PATHS = ("inproc", "cuda_ipc", "shm", "nixl", "tcp", "grpc")  # best first


@cache
def host_id() -> str:
    """Identity of this host (and network namespace): processes with the same id can share memory."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}/{socket.gethostname()}"


@cache
def nixl_available() -> bool:
    return importlib.util.find_spec("nixl") is not None


def sender_paths(device_type: str, allowed: frozenset[str] = frozenset(PATHS)) -> list[str]:
    """What a prefill worker on this device can write through (inproc is decided in-process)."""
    paths = ["cuda_ipc"] if device_type == "cuda" else ["shm"]
    if nixl_available():
        paths.append("nixl")
    paths.append("tcp")
    return [path for path in paths if path in allowed] + ["grpc"]


def parse_paths(text: str) -> frozenset[str]:
    """`--kv-paths`: a comma-separated subset of PATHS (grpc is always kept: it is the fallback)."""
    paths = {part.strip() for part in text.split(",") if part.strip()}
    unknown = paths - set(PATHS)
    if unknown:
        raise ValueError(f"unknown KV path(s) {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    return frozenset(paths | {"grpc"})


def choose_path(offered: set[str], requested: list[str], same_host: bool) -> str:
    """The best path both ends support; shm and cuda_ipc only within one host."""
    for path in PATHS:
        if path in offered and path in requested and (same_host or path not in ("shm", "cuda_ipc")):
            return path
    return "grpc"
