"""Small helpers every test tier shares: waiting on a condition, test images."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from PIL import Image

T = TypeVar("T")


class Deadline:
    """The end of a wait: `check()` fails the test, naming what it waited for, once it has passed."""

    def __init__(self, seconds: float, message: str) -> None:
        self.seconds, self.message = seconds, message
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise AssertionError(f"timed out after {self.seconds}s waiting for {self.message}")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = Deadline(timeout, message)
    while not (value := condition()):
        deadline.check()
        time.sleep(interval)
    return value


async def eventually(condition: Callable[[], T], within: float = 30.0, message: str = "condition") -> T:
    """`wait_until` inside an event loop: other tasks run while `condition` is polled for `within` seconds."""
    deadline = Deadline(within, message)
    while not (value := condition()):
        deadline.check()
        await asyncio.sleep(0.01)
    return value


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A deterministic noisy PNG (noise, so different images give different embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def worker_from_command_line(*argv: str):
    """A `Worker` configured exactly as `epd worker ARGV` would be (TLS off); not started."""
    import argparse
    from dataclasses import fields

    from epd.workers.launcher.worker_cli import add_arguments
    from epd.workers.stages.worker import Worker, WorkerConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.tls = None
    return Worker(WorkerConfig(**{f.name: getattr(args, f.name) for f in fields(WorkerConfig)}))
