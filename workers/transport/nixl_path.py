"""The NIXL path: prefill WRITEs each layer's blocks straight into the decode
worker's registered pool (RDMA through UCX between hosts; shared memory or TCP
when UCX finds no RDMA device), where the `nixl` package is importable.

Each worker process has one agent with its whole KV pool registered once. The
decode worker's agent metadata, the pool's base address and block count travel
in the `ReserveKV` reply; the sender adds that agent once and then describes,
per layer, the runs of blocks to write from its pool to the reservation."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass

import torch

from .block_copy import block_runs


def _memory_type(tensor: torch.Tensor) -> str:
    return "VRAM" if tensor.is_cuda else "DRAM"


class NixlAgent:
    """One process's agent with its KV pool (`[layers, 2, blocks, ...]`) registered."""

    def __init__(self, role: str, pool: torch.Tensor) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.pool = pool
        self.agent = nixl_agent(f"epd-{role}-{uuid.uuid4().hex[:12]}", nixl_agent_config(backends=["UCX"]))
        self.registration = self.agent.register_memory(pool)
        self.remotes: dict[str, str] = {}  # remote agent name -> the name add_remote_agent returned

    @property
    def device(self) -> int:
        return self.pool.device.index or 0

    def metadata(self) -> bytes:
        """What a sender needs to write into this pool (sent in the ReserveKV reply)."""
        return json.dumps({"agent": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                           "base": self.pool.data_ptr(), "blocks": self.pool.shape[2], "device": self.device,
                           "memory": _memory_type(self.pool)}).encode()

    def remote(self, metadata: bytes) -> "RemotePool":
        fields = json.loads(metadata)
        meta = base64.b64decode(fields["agent"])
        key = base64.b64encode(meta[:64]).decode() + str(fields["base"])
        if key not in self.remotes:
            self.remotes[key] = self.agent.add_remote_agent(meta)
        return RemotePool(self.remotes[key], int(fields["base"]), int(fields["blocks"]), int(fields["device"]),
                          fields["memory"])

    def close(self) -> None:
        self.agent.deregister_memory(self.registration)


@dataclass(frozen=True)
class RemotePool:
    agent: str
    base: int
    blocks: int
    device: int
    memory: str


class NixlLayerWriter:
    """Writes one handoff's layers (called on the compute thread) and waits for them all."""

    def __init__(self, local: NixlAgent, remote: RemotePool, targets: list[int]) -> None:
        self.local = local
        self.remote = remote
        self.targets = targets
        self.handles: list = []
        self.bytes = 0

    def write(self, layer: int, sources: list[int]) -> None:
        pool = self.local.pool
        block_bytes = pool[0, 0, 0].numel() * pool.element_size()
        local_descs, remote_descs = [], []
        for src, dst, length in block_runs(sources[:len(self.targets)], self.targets):
            for plane in range(2):
                local_descs.append((pool.data_ptr() + ((layer * 2 + plane) * pool.shape[2] + src) * block_bytes,
                                    length * block_bytes, self.local.device))
                remote_descs.append((self.remote.base + ((layer * 2 + plane) * self.remote.blocks + dst) * block_bytes,
                                     length * block_bytes, self.remote.device))
        agent = self.local.agent
        handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local_descs, _memory_type(pool)),
                                       agent.get_xfer_descs(remote_descs, self.remote.memory), self.remote.agent)
        if agent.transfer(handle) == "ERR":
            raise RuntimeError(f"NIXL write of layer {layer} failed to start")
        self.handles.append(handle)
        self.bytes += sum(size for _, size, _ in local_descs)

    def wait(self, timeout: float = 60.0) -> None:
        """Block until every layer's write is done (run off the event loop); raises on a failed one."""
        agent = self.local.agent
        deadline = time.monotonic() + timeout
        try:
            for handle in self.handles:
                while (state := agent.check_xfer_state(handle)) == "PROC":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NIXL writes not done within {timeout:.0f}s")
                    time.sleep(0.0002)  # polling the transfer's completion, as NIXL is meant to be used
                if state != "DONE":
                    raise RuntimeError(f"NIXL write failed ({state})")
        finally:
            for handle in self.handles:
                agent.release_xfer_handle(handle)
            self.handles = []
