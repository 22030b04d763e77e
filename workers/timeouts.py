"""Deadlines that never lose a cancellation.

Python 3.11's `asyncio.wait_for` returns the result when a cancellation
arrives just as the awaited call finishes, so the caller is never told it was
cancelled; a stage loop waiting on its queue that way can outlive its `stop()`
forever. `asyncio.timeout` (3.11+) has no such window; `within` gives it
`wait_for`'s shape."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """The result of `awaitable`, or TimeoutError after `seconds` (the awaitable is cancelled)."""
    async with asyncio.timeout(seconds):
        return await awaitable
