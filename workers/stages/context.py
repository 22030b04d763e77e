"""What every stage servicer of a worker process shares."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis

from .. import metrics
from ..cache import MetadataStore
from ..drain import ActiveCalls
from ..engine.thread_teams import pin_threads, pinned_executor
from ..models import ModelAdapter
from ..registry import WorkerDirectory
from ..transport.embedding_transport import EmbeddingTransport
from ..transport.grpc_transport import ChannelPool
from .supervision import WorkerHealth

R = TypeVar("R")


@dataclass
class WorkerContext:
    """One worker process: its address, model, Redis, peers and its single compute thread."""

    address: str
    adapter: ModelAdapter
    redis: aioredis.Redis
    metadata: MetadataStore
    directory: WorkerDirectory
    channels: ChannelPool = field(default_factory=ChannelPool)
    health: WorkerHealth = field(default_factory=WorkerHealth)
    calls: ActiveCalls = field(default_factory=ActiveCalls)  # what a drain waits for
    # One thread: the engines are synchronous and own the device. In colocated
    # mode all three stages share it, exactly like a single non-disaggregated server.
    # Its parallel regions run on `threads` threads (0: the process default); see `engine.thread_teams`.
    threads: int = 0
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = pinned_executor(self.threads, 1, "engine")
        self.embeddings = EmbeddingTransport(self.channels, self.directory)
        # jobs given to the compute thread and jobs it finished, each counted by one thread only
        self._submitted = self._finished = 0

    @property
    def compute_backlog(self) -> int:
        """Jobs queued on, or running on, the compute thread."""
        return self._submitted - self._finished

    async def _on_compute_thread(self, job: Callable[[], R]) -> R:
        def counted() -> R:
            try:
                self._own_thread_count()
                return job()
            finally:
                self._finished += 1

        self._submitted += 1
        return await asyncio.get_running_loop().run_in_executor(self.executor, counted)

    async def compute(self, stage: str, fn: Callable[..., R], *args) -> R:
        """Run engine work on the compute thread, counting busy time for the stage."""
        def timed() -> R:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                metrics.BUSY_SECONDS.labels(stage).inc(time.perf_counter() - start)

        return await self._on_compute_thread(timed)

    def _own_thread_count(self) -> None:
        """Give the engine thread its count again before each job: PyTorch code compiled into another
        library (an extension, a compiled graph) sets a thread's count from the process-wide setting, the
        last count any thread chose (a helper's one), the first time it runs on that thread."""
        pin_threads(self.threads)

    async def compute_shared(self, fn: Callable[..., tuple[R, dict[str, float]]], *args) -> R:
        """Engine work for several stages at once (a colocated worker's mixed step): `fn` returns its result
        and each stage's share of the work, and the busy time is split between the stages by those shares."""
        def timed() -> R:
            start = time.perf_counter()
            result, shares = fn(*args)
            elapsed, total = time.perf_counter() - start, sum(shares.values())
            for stage, share in shares.items():
                if share:
                    metrics.BUSY_SECONDS.labels(stage).inc(elapsed * share / total)
            return result

        return await self._on_compute_thread(timed)
