"""Stage loops that never die silently.

Every stage runs a long-lived loop (a batcher, a scheduler). An exception in
one batch fails only that batch's requests; the loop itself is supervised, and
if it ends for any reason other than `stop()` the worker is reported dead: its
gRPC health turns NOT_SERVING and it leaves discovery, so the router stops
sending it work instead of hanging requests on a loop that no longer runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..background import cancel_and_wait

log = logging.getLogger(__name__)


class WorkerHealth:
    """The worker's liveness as its stage loops see it; `dead` is set once, with the reason."""

    def __init__(self) -> None:
        self.dead = asyncio.Event()
        self.reason = ""

    def report_dead(self, reason: str) -> None:
        if not self.dead.is_set():
            log.error("worker no longer serving: %s", reason)
            self.reason = reason
            self.dead.set()


class SupervisedLoop:
    """Runs one stage loop as a task and reports the worker dead if it ends unexpectedly."""

    def __init__(self, name: str, health: WorkerHealth | None) -> None:
        self.name = name
        self.health = health
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._task = asyncio.create_task(loop(), name=self.name)
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception()) if task.exception() else "returned"
        if self.health is not None:
            self.health.report_dead(f"{self.name} loop ended ({reason})")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)
