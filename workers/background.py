"""Fire-and-forget work on the event loop (a cache announcement, a settle step):
the loop keeps only weak references to tasks, so one nobody holds can be
collected before it finishes. `spawn` holds it until done and logs its failure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
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
