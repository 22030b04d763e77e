"""Per-stage micro-batching: collect work until a cost budget is full or the
oldest item has waited `max_wait` seconds, then run it as one batch.

An exception from a batch fails exactly that batch (through `fail_batch`) and
the loop goes on; the loop itself is supervised (see `supervision`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .. import metrics
from ..background import end_if_cancelled
from ..timeouts import within
from .supervision import SupervisedLoop, WorkerHealth

T = TypeVar("T")
log = logging.getLogger(__name__)


class MicroBatcher(Generic[T]):
    def __init__(self, stage: str, run_batch: Callable[[list[T]], Awaitable[None]], max_cost: int,
                 max_wait: float, fail_batch: Callable[[list[T], Exception], None],
                 cost: Callable[[T], int] = lambda _: 1, health: WorkerHealth | None = None) -> None:
        if max_cost <= 0:
            raise ValueError(f"{stage}: batch budget must be > 0, got {max_cost}")
        self.stage = stage
        self.run_batch, self.fail_batch = run_batch, fail_batch
        self.max_cost, self.max_wait, self.cost = max_cost, max_wait, cost
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._carry: T | None = None
        self._loop = SupervisedLoop(f"{stage} batcher", health)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def submit(self, item: T) -> None:
        self._queue.put_nowait(item)
        metrics.QUEUE_DEPTH.labels(self.stage).set(self.depth)

    def start(self) -> None:
        self._loop.start(self._run)

    async def stop(self) -> None:
        await self._loop.stop()

    async def _next_batch(self) -> list[T]:
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, used = [first], self.cost(first)
        deadline = time.monotonic() + self.max_wait
        while used < self.max_cost:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await within(self._queue.get(), remaining)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if used + self.cost(item) > self.max_cost:
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            used += self.cost(item)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            metrics.QUEUE_DEPTH.labels(self.stage).set(self.depth)
            metrics.BATCH_SIZE.labels(self.stage).observe(len(batch))
            try:
                await self.run_batch(batch)
            except Exception as exc:  # e.g. a device out-of-memory: fail this batch, keep serving
                log.exception("%s batch of %d failed", self.stage, len(batch))
                self.fail_batch(batch, exc)
            end_if_cancelled()  # a batch's Redis writes can swallow the cancellation of stop()
