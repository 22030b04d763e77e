"""A worker killed mid-request: the request is resumed on a surviving replica and
completes as if nothing happened; the others keep being served."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from ..conftest import wait_until
from .harness import chat_body, png_bytes, running, start_serve

MODEL = "tiny-llava"
# long enough that the kill lands mid-stream: 400 tokens of tiny-llava once all streamed before the busy worker
# was found and killed (no resume happened)
TOKENS = 2000


@pytest.fixture(scope="module")
def served(redis_server):
    server = start_serve(MODEL, redis_server, "--decode", "2", "--quiet")
    yield server
    server.stop()


def test_decode_worker_killed_mid_stream(served):
    body = chat_body(MODEL, "Tell me a very long story.", [], max_tokens=TOKENS, stream=True)
    undisturbed = httpx.post(served.base_url + "/chat/completions", json={**body, "stream": False}, timeout=120)
    events = []
    with httpx.stream("POST", served.base_url + "/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 5:
                break
        busy = wait_until(lambda: [w for w in served.workers("decode")
                                   if served.metric(w.metrics_url, "epd_stage_in_flight", stage="decode") > 0],
                          30, message="the decode worker serving the stream")
        os.kill(busy[0].pid, signal.SIGKILL)
        events.extend(line[6:] for line in lines if line.startswith("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role") is None]
    assert len(tokens) == TOKENS and tokens[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in tokens)
    assert text == undisturbed.json()["choices"][0]["message"]["content"]  # greedy: as if undisturbed
    assert served.router_metric("epd_router_recoveries_total", kind="resume") == 1

    wait_until(lambda: busy[0].address not in [w.address for w in served.workers("decode")], 15,
               message="the dead decode worker to drop out of discovery")
    reply = httpx.post(served.base_url + "/chat/completions", json=chat_body(MODEL, "Still there?", []), timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 8
    assert served.router_metric("epd_router_in_flight") == 0


def test_requests_succeed_while_redis_is_unreachable(served):
    image_body = chat_body(MODEL, "What is this?", [png_bytes(40, 40, seed=5)])
    before = httpx.post(served.base_url + "/chat/completions", json=image_body, timeout=60)
    assert before.status_code == 200
    pids = {w.pid for stage in ("encode", "prefill", "decode") for w in served.workers(stage)}
    served.redis.process.terminate()
    served.redis.process.wait(10)
    after = httpx.post(served.base_url + "/chat/completions", json=image_body, timeout=60)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"] == before.json()["choices"][0]["message"]["content"]
    health_url = served.base_url.removesuffix("/v1") + "/health"
    health = wait_until(lambda: (r := httpx.get(health_url, timeout=10)).json()["redis"] == "unreachable" and r,
                        10, message="/health to report Redis down")
    assert health.status_code == 200  # the router keeps serving from its last view of the workers
    served.stop()
    assert not [pid for pid in pids if running(pid)]  # SIGTERM took every worker down
