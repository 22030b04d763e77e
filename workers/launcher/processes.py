"""Child processes that print a READY line: `epd serve`'s workers, router and
Redis, and `epd serve` itself as the benchmarks and the tests start it. Each is
started in its own process group, its output echoed with a name prefix (unless
quiet) and kept (its last lines, or all of them), readiness read from a marker
line, restarted when it dies (with back-off, giving up on a crash loop), and all
of them stopped together (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

QUICK_EXIT = 30.0  # seconds: a child dying sooner than this after its start counts towards a crash loop


EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a process started next to bind. Taken below the kernel's ephemeral range where
    there is one: a port the kernel assigned would go back into that range when this probe closes, and any
    socket bound to port 0 meanwhile (UCX's listeners, a KV listener, a gRPC client) could take it before
    the process binds it ("address already in use" at start-up)."""
    low = _ephemeral_low()
    choices = range(max(1024, low - 16384), low) if low > 2048 else range(0, 1)
    for _ in range(200):
        port = random.choice(choices)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        _handed_out.add(port)
        return port
    raise OSError(f"no free port on {host} below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        with open(EPHEMERAL_RANGE) as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the kernel chooses


def epd_command(*args: str) -> list[str]:
    """`epd ...` in this interpreter; -P keeps the checkout root off sys.path."""
    return [sys.executable, "-P", "-m", "epd.cli", *args]


def start_serve(group: ProcessGroup, model: str, port: int, *extra: str, timeout: float = 600.0) -> Child:
    """`epd serve --model MODEL --port PORT EXTRA...` in `group`, past its EPD_SERVE_READY line (whose
    `ready_fields` name `router-metrics` and `redis`); RuntimeError with its last lines if it fails."""
    child = group.start("epd serve", epd_command("serve", "--model", model, "--port", str(port), *extra),
                        "EPD_SERVE_READY")
    group.wait_ready([child], timeout)
    return child


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
    lines: deque[str] = field(default_factory=deque)  # its output (the last lines, or all), even when quiet
    quick_exits: int = 0  # consecutive exits soon after a start (a crash loop)

    @property
    def ready_fields(self) -> dict[str, str]:
        """The `key=value` words of the ready line (`EPD_WORKER_READY role=encode address=...`)."""
        return dict(word.split("=", 1) for word in self.ready_line.split() if "=" in word)

    def output(self) -> str:
        return "\n".join(self.lines)

    def echo(self, quiet: bool) -> None:
        assert self.process.stdout is not None  # started with stdout=PIPE
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            if not self.ready.is_set() and self.ready_marker in line:
                self.ready_line = line
                self.ready.set()
            if not quiet:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)


class ProcessGroup:
    """The children one process started; `with ProcessGroup() as group:` stops them all on the way out."""

    def __init__(self, quiet: bool = False, keep_lines: int | None = 15) -> None:
        self.children: list[Child] = []
        self.quiet = quiet
        self.keep_lines = keep_lines  # None: keep every line (tests read whole logs)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, name: str, command: list[str], ready_marker: str, env: dict[str, str] | None = None,
              stop_last: bool = False) -> Child:
        """Start `command` with `env` added to this process's environment; `wait_ready` waits for the marker."""
        env = {**os.environ, **(env or {})}
        child = Child(name, self._spawn(command, env), ready_marker, command, env, stop_last=stop_last,
                      lines=deque(maxlen=self.keep_lines))
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
                                       + "\n".join(f"  [{child.name}] {line}" for line in child.lines))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not become ready within {timeout:.0f}s")

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def first_dead(self) -> Child | None:
        return next(iter(self.dead()), None)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the last started first: the router, so no new work starts), then SIGKILL whatever
        outlives `grace`; children marked `stop_last` (Redis) after the others."""
        deadline = time.monotonic() + grace
        for last in (False, True):
            _stop([c for c in reversed(self.children) if c.stop_last == last], deadline)

    @staticmethod
    def stop_child(child: Child, grace: float = 10.0) -> int:
        """Stop one child as `stop` does; its exit code."""
        _stop([child], time.monotonic() + grace)
        return child.process.returncode


def _stop(children: list[Child], deadline: float) -> None:
    for child in children:
        _signal_group(child.process, signal.SIGTERM)
    for child in children:
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
