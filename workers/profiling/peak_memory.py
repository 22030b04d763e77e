"""Peak memory of one call, as the device's allocator sees it (CUDA) or as the
process's resident set does (CPU: torch keeps no CPU allocator statistics).

On CPU the kernel's resident high-water mark (VmHWM) is reset before the call
through /proc/self/clear_refs, and glibc is told to serve large blocks with
mmap and give them back on free (a fixed M_MMAP_THRESHOLD also stops glibc's
adaptive threshold), so a freed activation does not stay resident and hide
the next call's peak. Where neither exists, getrusage's ru_maxrss is the
fallback: it cannot be reset, so it only shows peaks above every earlier one."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_FROM_BYTES = 128 * 1024
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


class PeakMeter:
    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.device = device
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        elif _resettable():
            _return_freed_blocks()
            self.method = "resident set high-water (VmHWM, reset per call)"
        else:
            self.method = "ru_maxrss (not resettable: peaks below an earlier one read as 0)"

    def peak_above_start(self, call: Callable[[], object]) -> int:
        """Bytes the call needed at its peak beyond what was in use when it started."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            start = self.torch.cuda.memory_allocated(self.device)
            call()
            self.torch.cuda.synchronize(self.device)
            return max(0, self.torch.cuda.max_memory_allocated(self.device) - start)
        if self.method.startswith("resident"):
            CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
            start = _status_bytes("VmRSS")
            call()
            return max(0, _status_bytes("VmHWM") - start)
        before = _max_rss()
        call()
        return max(0, _max_rss() - before)

    def in_use(self) -> int:
        """Bytes in use now: allocated tensors (CUDA) or the resident set (CPU)."""
        if self.cuda:
            return int(self.torch.cuda.memory_allocated(self.device))
        return _status_bytes("VmRSS") if STATUS.exists() else _max_rss()

    def runtime_reserve(self, before_weights: int) -> int:
        """Memory the runtime holds beyond tensors: on CUDA what the device reports used minus what the
        allocator handed out, once its cache of freed blocks is emptied (context, library workspaces); on
        CPU the process before any weights."""
        if self.cuda:
            self.torch.cuda.empty_cache()
            free, total = self.torch.cuda.mem_get_info(self.device)
            return max(0, int(total - free - self.torch.cuda.memory_allocated(self.device)))
        return before_weights


def parameter_bytes(modules: Iterable[Any]) -> int:
    """Bytes of the parameters and buffers of some torch modules (shared tensors counted once)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def _resettable() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return STATUS.exists()
    except OSError:
        return False


def _return_freed_blocks() -> None:
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_FROM_BYTES)


def _status_bytes(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{STATUS} has no {field}")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
