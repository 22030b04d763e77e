"""CUDA IPC: another process on the same host opens the decode pool's device
memory and writes into it directly (device-to-device, no host round trip).

The handle travels as plain JSON fields (never a pickle: the peer's bytes are
data, not code) and is rebuilt with torch's own CUDA IPC reduction."""

from __future__ import annotations

import base64
import json

import torch


def export_handle(tensor: torch.Tensor) -> bytes:
    """An IPC handle of a CUDA tensor; the exporting process must keep the tensor alive."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    (_, size, stride, offset, _, dtype, device, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    fields = {"size": list(size), "stride": list(stride), "offset": offset,
              "dtype": str(dtype).removeprefix("torch."), "device": device, "handle": _b64(handle),
              "storage_bytes": storage_bytes, "storage_offset": storage_offset, "ref_handle": _b64(ref_handle),
              "ref_offset": ref_offset, "event_handle": _b64(event_handle), "event_sync": bool(event_sync)}
    return json.dumps(fields).encode()


def open_handle(data: bytes) -> torch.Tensor:
    """The exporting process's tensor, mapped into this one (raises on another host or without a GPU)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    f = json.loads(data)
    dtype = getattr(torch, f["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a dtype: {f['dtype']!r}")
    return rebuild_cuda_tensor(torch.Tensor, tuple(f["size"]), tuple(f["stride"]), int(f["offset"]),
                               torch.UntypedStorage, dtype, int(f["device"]), _bytes(f["handle"]),
                               int(f["storage_bytes"]), int(f["storage_offset"]), False, _bytes(f["ref_handle"]),
                               int(f["ref_offset"]), _bytes(f["event_handle"]), bool(f["event_sync"]))


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)
