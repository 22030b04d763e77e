"""Redis is optional at run time: with the redis-server `epd serve` started and
supervises, a Redis that hangs and then dies costs no request; `epd serve` starts it
again, and the workers re-register."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from ..conftest import wait_until
from .harness import chat_body, png_bytes, start_serve

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def served():
    server = start_serve(MODEL, None, "--quiet")  # its own redis-server
    yield server
    server.stop()


def redis_pid(served) -> int | None:
    try:
        return served.redis.client().info("server")["process_id"]
    except Exception:  # noqa: BLE001 (down, restarting, or refusing: all mean "not this one yet")
        return None


def test_requests_are_served_while_redis_is_away_and_everything_comes_back(served):
    body = chat_body(MODEL, "What is in this picture?", [png_bytes(40, 36, seed=31)])
    health = served.base_url.removesuffix("/v1") + "/health"

    def ask() -> str:
        reply = httpx.post(served.base_url + "/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    answer = ask()
    pid = redis_pid(served)
    os.kill(pid, signal.SIGSTOP)  # Redis hangs: every call to it runs into its timeout
    try:
        assert [ask() for _ in range(2)] == [answer] * 2
        status = wait_until(lambda: (r := httpx.get(health, timeout=30)).json()["redis"] == "unreachable" and r, 30,
                            message="/health to report Redis unreachable")
        assert status.status_code == 200  # still serving, from the last view of the workers
    finally:
        os.kill(pid, signal.SIGKILL)  # ... then it dies; epd serve starts it again on the same port
    wait_until(lambda: redis_pid(served) not in (None, pid), 60, message="epd serve to restart redis-server")
    assert ask() == answer  # the restarted Redis is empty: discovery's last view and recompute carry on
    wait_until(lambda: all(len(served.workers(stage)) == 1 for stage in ("encode", "prefill", "decode")), 30,
               message="the workers to re-register")
    wait_until(lambda: httpx.get(health, timeout=10).json()["redis"] == "ok", 30, message="/health to see Redis")
    assert ask() == answer
    assert served.process.poll() is None  # epd serve kept going
    assert any("redis exited with code -9; restarting" in line for line in served.log)
