"""/healthz (liveness) and /metrics of the operator process, on one port.

Liveness means the loops the process depends on are still turning: each one
beats, and a loop that has not beaten within its own limit makes /healthz
answer 503 so the kubelet restarts the pod. A standby waiting for the Lease is
alive too (its waiting loop beats)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY


@dataclass
class Liveness:
    clock: Callable[[], float] = time.monotonic
    beats: dict[str, tuple[float, float]] = field(default_factory=dict)  # loop -> (last beat, limit seconds)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def beat(self, loop: str, limit: float) -> None:
        with self.lock:
            self.beats[loop] = (self.clock(), limit)

    def forget(self, loop: str) -> None:
        with self.lock:
            self.beats.pop(loop, None)

    def stalled(self) -> list[str]:
        now = self.clock()
        with self.lock:
            return sorted(loop for loop, (last, limit) in self.beats.items() if now - last > limit)


def serve(host: str, port: int, liveness: Liveness) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; `server.shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                stalled = liveness.stalled()
                body = (f"stalled: {', '.join(stalled)}" if stalled else "ok").encode()
                self._reply(503 if stalled else 200, "text/plain", body)
            elif self.path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            else:
                self._reply(404, "text/plain", b"not found")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:  # probes every few seconds are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
