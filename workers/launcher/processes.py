"""Child processes of `epd serve`: started in their own process group, their
output echoed with a name prefix, readiness read from a marker line, restarted
when they die (with back-off, giving up on a crash loop), and all of them
stopped together (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

QUICK_EXIT = 30.0  # seconds: a child dying sooner than this after its start counts towards a crash loop


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
    command: list[str]
    env: dict[str, str]
    ready: threading.Event = field(default_factory=threading.Event)
    ready_line: str = ""
    started: float = field(default_factory=time.monotonic)
    stop_last: bool = False  # stopped after the others (Redis: workers deregister on their way out)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=15))  # its last lines, even when quiet
    quick_exits: int = 0  # consecutive exits soon after a start (a crash loop)

    def echo(self, quiet: bool) -> None:
        for raw in self.process.stdout:  # type: ignore[union-attr]
            line = raw.rstrip("\n")
            self.tail.append(line)
            if not self.ready.is_set() and self.ready_marker in line:
                self.ready_line = line
                self.ready.set()
            if not quiet:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)


class ProcessGroup:
    def __init__(self, quiet: bool = False) -> None:
        self.children: list[Child] = []
        self.quiet = quiet

    def start(self, name: str, command: list[str], ready_marker: str, env: dict[str, str] | None = None,
              stop_last: bool = False) -> Child:
        env = {**os.environ, **(env or {})}
        child = Child(name, self._spawn(command, env), ready_marker, command, env, stop_last=stop_last)
        threading.Thread(target=child.echo, args=(self.quiet,), daemon=True).start()
        self.children.append(child)
        return child

    @staticmethod
    def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)

    def restart(self, child: Child) -> None:
        """Start a dead child again with the same command (a worker gets a new port; Redis keeps its own)."""
        child.quick_exits = child.quick_exits + 1 if time.monotonic() - child.started < QUICK_EXIT else 0
        child.process = self._spawn(child.command, child.env)
        child.started = time.monotonic()
        child.ready = threading.Event()
        threading.Thread(target=child.echo, args=(self.quiet,), daemon=True).start()

    def wait_ready(self, children: list[Child], timeout: float) -> None:
        """Block until every child printed its marker; raise naming the first one that died or timed out."""
        deadline = time.monotonic() + timeout
        for child in children:
            while not child.ready.wait(0.1):
                if child.process.poll() is not None:
                    time.sleep(0.2)  # let the echo thread read its last words
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode} during start-up:\n"
                                       + "\n".join(f"  [{child.name}] {line}" for line in child.tail))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not become ready within {timeout:.0f}s")

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def first_dead(self) -> Child | None:
        return next(iter(self.dead()), None)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the router first, so no new work starts), then SIGKILL whatever outlives `grace`."""
        deadline = time.monotonic() + grace
        for last in (False, True):
            group = [c for c in reversed(self.children) if c.stop_last == last]
            for child in group:
                _signal_group(child.process, signal.SIGTERM)
            for child in group:
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
