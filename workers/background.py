"""Background work on the event loop.

`spawn` runs fire-and-forget work (a cache announcement, a settle step): the
loop keeps only weak references to tasks, so one nobody holds can be collected
before it finishes; `spawn` holds it until done and logs its failure.

`periodically` runs a step every few seconds (a heartbeat, a discovery refresh)
until cancelled. A cancellation can be lost inside a library: Python 3.11's
`asyncio.wait_for`, which redis-py uses for every write under a socket
timeout, returns normally when the cancellation meets a write that has just
finished. A loop that went on would never stop (a worker heartbeating after it
deregistered, a `stop()` that waits forever), so long-lived loops call
`end_if_cancelled` after each step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

_running: set[asyncio.Task[Any]] = set()


def spawn(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run `coroutine` in the background until it ends; a failure is logged, not raised."""
    task = asyncio.ensure_future(coroutine)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s failed", task.get_coro(), exc_info=task.exception())


async def periodically(interval: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Await `step` every `interval` seconds until cancelled; a failing step is logged and retried."""
    while True:
        await asyncio.sleep(interval)  # a period, not synchronisation
        try:
            await step()
        except Exception:  # a loop that died silently would stop heartbeats or freeze a view forever
            log.exception("%s failed", what)
        end_if_cancelled()


def end_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled but the CancelledError never reached it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and return once it has ended, however it ends."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
