"""One multi-threaded OpenMP team per worker process: the engine thread's.

PyTorch's CPU ops, oneDNN's matmuls and Inductor's loops run their parallel
regions on OpenMP (GNU libgomp in PyTorch's wheels). libgomp gives every thread
that opens a parallel region a team of its own, and once the threads it manages
outnumber the CPUs it stops spinning at barriers: each team member then sleeps
in the kernel after every region and is woken for the next, and a forward has
hundreds of regions. A worker whose engine thread already uses every core (the
default) reaches that point as soon as one more thread opens a team: the event
loop looking up a prompt's embeddings (prefill does that as a request comes
in), a helper thread preprocessing images or copying KV frames. It stays there
for the life of the process, since teams live as long as their threads.
Measured here (small-llava, bfloat16, 2 cores, offline): a decode step of 8
sequences took 8.4 ms with one team and 14-17 ms once a second thread had
opened one; a step of 64 sequences 32 against 44-47 ms.

So a worker pins its engine thread to its intra-op thread count and every other
thread that may run torch ops to one thread (a region of one thread opens no
team)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def pin_threads(count: int) -> None:
    """Run this thread's parallel regions on `count` threads from now on (0: the process default)."""
    # PyTorch settles a thread's count from the process-wide setting at the thread's first parallel
    # op; settle it first, or that first op would undo the count set here.
    default = torch.get_num_threads()
    torch.set_num_threads(count or default)


def pinned_executor(count: int, workers: int | None, name: str) -> ThreadPoolExecutor:
    """A thread pool (of `workers` threads; None: the standard library's default) whose threads run their
    parallel regions on `count` threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=pin_threads, initargs=(count,))
