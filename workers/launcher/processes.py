"""Child processes of `epd serve`: started in their own process group, their
output echoed with a name prefix, readiness read from a marker line, and all
of them stopped together (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def epd_command(*args: str) -> list[str]:
    """`epd ...` in this interpreter; -P keeps the checkout root off sys.path."""
    return [sys.executable, "-P", "-m", "epd.cli", *args]


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    ready_marker: str
    ready: threading.Event = field(default_factory=threading.Event)
    ready_line: str = ""

    def echo(self, quiet: bool) -> None:
        for raw in self.process.stdout:  # type: ignore[union-attr]
            line = raw.rstrip("\n")
            if not self.ready.is_set() and self.ready_marker in line:
                self.ready_line = line
                self.ready.set()
            if not quiet:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)


class ProcessGroup:
    def __init__(self, quiet: bool = False) -> None:
        self.children: list[Child] = []
        self.quiet = quiet

    def start(self, name: str, command: list[str], ready_marker: str, env: dict[str, str] | None = None) -> Child:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env={**os.environ, **(env or {})})
        child = Child(name, process, ready_marker)
        threading.Thread(target=child.echo, args=(self.quiet,), daemon=True).start()
        self.children.append(child)
        return child

    def wait_ready(self, children: list[Child], timeout: float) -> None:
        """Block until every child printed its marker; raise naming the first one that died or timed out."""
        deadline = time.monotonic() + timeout
        for child in children:
            while not child.ready.wait(0.1):
                if child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode} during start-up")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not become ready within {timeout:.0f}s")

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def first_dead(self) -> Child | None:
        return next(iter(self.dead()), None)

    def stop(self, grace: float = 10.0) -> None:
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
