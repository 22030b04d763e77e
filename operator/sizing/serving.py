"""What a simulated deployment is made of: the serving configuration (mode,
pool sizes, batch limits), its GPU instances with their memory layout and
queues, and what the autoscaler observes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .memory import InstanceMemory
from .perfmodel import PerformanceModel
from .workload import SimRequest

MODES = ("epd", "bundled", "colocated")
ROLES = {"epd": {"encode": "encode", "prefill": "prefill", "decode": "decode"},
         "bundled": {"prefill": "encode+prefill", "decode": "decode"},
         "colocated": {"colocated": "colocated"}}


@dataclass(frozen=True)
class ServingConfig:
    mode: str
    encode: int = 0  # instances (GPUs) per pool; `encode` counts E+P instances in bundled mode
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    intra_request_parallel: bool = True
    encode_batch: int = 16
    prefill_budget: int = 16384
    decode_batch: int = 128

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if min(self.encode_batch, self.prefill_budget, self.decode_batch) <= 0:
            raise ValueError("batch limits must be positive")

    @property
    def gpus(self) -> int:
        return {"epd": self.encode + self.prefill + self.decode, "bundled": self.encode + self.decode,
                "colocated": self.colocated}[self.mode]

    def pool_sizes(self) -> dict[str, int]:
        return {"epd": {"encode": self.encode, "prefill": self.prefill, "decode": self.decode},
                "bundled": {"prefill": self.encode, "decode": self.decode},
                "colocated": {"colocated": self.colocated}}[self.mode]

    def label(self) -> str:
        if self.mode == "epd":
            return f"{self.encode}E{self.prefill}P{self.decode}D" + ("" if self.intra_request_parallel else "-noIRP")
        if self.mode == "bundled":
            return f"{self.encode}EP{self.decode}D"
        return f"{self.colocated}x(EPD)"


def instance_memory(model: PerformanceModel, config: ServingConfig) -> dict[str, InstanceMemory]:
    """The memory layout of each pool's GPUs under the config's batch limits."""
    return {pool: model.instance_memory(role, config.encode_batch, config.prefill_budget, config.decode_batch)
            for pool, role in ROLES[config.mode].items()}


@dataclass
class Instance:
    pool: str
    memory: InstanceMemory
    ready_at: float = 0.0
    busy_until: float = 0.0
    busy_time: float = 0.0  # since the autoscaler's last look
    draining: bool = False
    queue: deque[Any] = field(default_factory=deque)  # encode: (request, image index); prefill, decode: requests
    active: list[SimRequest] = field(default_factory=list)  # decode: running sequences
    waiting: list[SimRequest] = field(default_factory=list)  # colocated: requests to prefill
    running: bool = False
    kv_used: int = 0  # tokens held in the KV pool
    retired_at: float = -1.0
    # what the run's report reads
    busy_total: float = 0.0
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    memory_cut: int = 0  # batches (decode: steps) kept smaller by memory while more work waited
    blocked_since: float = -1.0
    blocked_time: float = 0.0  # idle with work queued that memory kept out
    preemptions: int = 0
    peak_kv: int = 0
    peak_activation: float = 0.0

    def load(self) -> float:
        return len(self.queue) + len(self.active) + len(self.waiting) + (1 if self.running else 0)


@dataclass
class Observation:
    """What the autoscaler sees at a control tick (the window since the last one)."""

    time: float
    window: float
    arrivals: int
    images: int
    completed: list[SimRequest]
    queue: dict[str, int]
    busy: dict[str, float]
    replicas: dict[str, int]
    pending: dict[str, int]
    kv_usage: float
    occupancy: float  # decode sequences active or waiting / (decode instances x batch limit); > 1 = queued


@dataclass(frozen=True)
class ImageCost:
    patch_tokens: int
    tile_token_squares: int
    megapixels: float
    llm_tokens: int
