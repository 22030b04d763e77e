"""Fixtures shared by the test tiers: a real redis-server, free ports, and
waiting for a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from epd.workers.launcher.processes import free_port

from .helpers import wait_until

# Built-in presets are materialised once per test session, outside the user's cache.
os.environ.setdefault("EPD_MODEL_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "epd-test-models"))


class RedisServer:
    def __init__(self, port: int, process: subprocess.Popen) -> None:
        self.port = port
        self.process = process
        self.url = f"redis://127.0.0.1:{port}/0"

    def client(self):
        import redis

        return redis.Redis(port=self.port)


def start_redis() -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh`")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, process)
    wait_until(lambda: _pings(server), 10, message=f"redis-server on port {port}")
    return server


def _pings(server: RedisServer) -> bool:
    import redis

    try:
        return bool(server.client().ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
async def worker(redis_server: RedisServer):
    """A real colocated tiny-llava worker in this process: gRPC on a loopback socket, real Redis."""
    from epd.workers.stages.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(role="colocated", model="tiny-llava", redis_url=redis_server.url))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.process.terminate()
    server.process.wait(10)
