"""How many CPU threads a forward runs on.

A forward of a few tokens (a decode step of a small batch) is a chain of small
matrix-vector products, each its own OpenMP parallel region, and each region
waits for its slowest thread. In a server the worker's threads share the cores
with the router, the clients and the kernel, so one preempted thread can stall
every region: on a host with native bfloat16 (small-llava, bfloat16, 2 cores,
one request at a time through `epd serve --colocated`) a batch-1 decode step
took 16 ms on two threads and 11.7 ms on one. Where a small step streams its
weights from memory (float32 on an AVX2 EPYC) two threads read faster and one
thread loses (15.6 against 11.9 ms offline), so it is off unless asked for.
Larger forwards (prefill chunks, mixed steps, big decode batches) gain from
every thread, so only forwards of at most `small_step_tokens` tokens drop to one.

TorchInductor guards its compiled graphs on the thread count, so the decoder
compiles its graphs for both counts at start (see `PackedDecoder.warm_up`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepThreads:
    small_step_tokens: int = 0  # forwards of at most this many tokens run on one thread (0: never)

    def __post_init__(self) -> None:
        if self.small_step_tokens < 0:
            raise ValueError(f"small_step_tokens must be >= 0, got {self.small_step_tokens}")

    def single(self, device: torch.device, tokens: int) -> bool:
        """Whether a forward of `tokens` tokens on `device` runs on one thread."""
        return device.type == "cpu" and tokens <= self.small_step_tokens and torch.get_num_threads() > 1

    @contextmanager
    def for_forward(self, device: torch.device, tokens: int) -> Iterator[None]:
        """Run the body on one thread if the forward is small, and restore the thread count after."""
        if not self.single(device, tokens):
            yield
            return
        full = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(full)

    def counts(self, device: torch.device) -> list[int]:
        """The thread counts forwards on `device` will run with (each needs its compiled graphs)."""
        full = torch.get_num_threads()
        return [full, 1] if self.single(device, 1) else [full]
