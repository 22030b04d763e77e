"""No request lost under steady load through `epd serve --encode 2 --prefill 2 --decode 2`:
SIGKILL of a decode worker mid-stream resumes its requests on the other one (greedy text
equal to an undisturbed run); SIGTERM of any worker drains it (out of discovery first,
then it finishes what it holds); a prefill or decode worker killed before the first
token has its requests retried on a sibling."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import aiohttp
import pytest

from epd.stages import STAGES
from epd.workers.router.routing import decode_rank

from ..conftest import wait_until
from .harness import chat_body, png_bytes, running, start_serve

MODEL = "tiny-llava"
TOKENS = 1500  # long enough that a kill seen mid-stream lands mid-stream (600 tokens once took 0.5 s)
LOAD = [(f"Request {i}: tell me everything about it.", [png_bytes(36 + 4 * i, 32, seed=900 + i)] if i % 2 else [])
        for i in range(8)]


@pytest.fixture(scope="module")
def served(redis_server):
    server = start_serve(MODEL, redis_server, "--encode", "2", "--prefill", "2", "--decode", "2", "--quiet")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def undisturbed(served) -> list[str]:
    """The greedy texts of the load, served with nothing killed."""
    return [result["text"] for result in asyncio.run(_run_load(served, disturb=None))]


async def _stream(session: aiohttp.ClientSession, url: str, text: str, images: list[bytes],
                  progress: list[int] | None = None, index: int = 0) -> dict:
    """One streamed request; `progress[index]` counts the events received so far."""
    body = chat_body(MODEL, text, images, max_tokens=TOKENS, stream=True)
    events = []
    async with session.post(url + "/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in _data_lines(response):
            events.append(line[6:])
            if progress is not None:
                progress[index] = len(events)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    tokens = [c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("role") is None]
    return {"errors": errors, "tokens": len(tokens), "finish": tokens[-1]["choices"][0]["finish_reason"],
            "text": "".join(c["choices"][0]["delta"].get("content", "") for c in tokens)}


async def _data_lines(response):
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line


async def _run_load(served, disturb) -> list[dict]:
    """The load as concurrent streams; `disturb(progress)` (blocking) runs in a thread while they
    flow, `progress` holding the events each stream has received so far."""
    progress = [0] * len(LOAD)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        streams = [asyncio.create_task(_stream(session, served.base_url, text, images, progress, index))
                   for index, (text, images) in enumerate(LOAD)]
        if disturb is not None:
            await asyncio.to_thread(disturb, progress)
        return await asyncio.gather(*streams)


def _assert_nothing_lost(results: list[dict], undisturbed: list[str]) -> None:
    for index, (result, expected) in enumerate(zip(results, undisturbed, strict=True)):
        assert result["errors"] == [], (index, result["errors"])
        assert (result["tokens"], result["finish"]) == (TOKENS, "length"), index
        assert result["text"] == expected, index


def _busy(served, stage: str) -> list:
    return [w for w in served.workers(stage)
            if served.metric(w.metrics_url, "epd_stage_in_flight", stage=stage) > 0]



def _two_per_stage(served, stages: tuple[str, ...] = STAGES) -> bool:
    """Two workers per stage in discovery and in the router's own view (refreshed apart from it)."""
    health = json.loads(urllib.request.urlopen(served.base_url.removesuffix("/v1") + "/health", timeout=5).read())
    return all(len(served.workers(s)) == 2 and health.get("workers", {}).get(s) == 2 for s in stages)


def _recoveries(served, kind: str) -> float:
    return served.router_metric("epd_router_recoveries_total", kind=kind)


def test_sigkill_of_a_decode_worker_mid_stream_loses_nothing(served, undisturbed):
    resumed = _recoveries(served, "resume")
    victims = []

    def kill_busiest_decode(progress: list[int]) -> None:
        # mid-stream: every request has had tokens, so the victim's requests resume rather than retry
        wait_until(lambda: min(progress) > 2, 60, message="tokens on every stream")
        busy = wait_until(lambda: _busy(served, "decode"), 60, message="a decode worker holding streams")
        victims.append(busy[0])
        os.kill(busy[0].pid, signal.SIGKILL)

    results = asyncio.run(_run_load(served, kill_busiest_decode))
    _assert_nothing_lost(results, undisturbed)
    assert _recoveries(served, "resume") > resumed
    wait_until(lambda: len(served.workers("decode")) == 2 and victims[0].address not in
               [w.address for w in served.workers("decode")], 60, message="epd serve to replace the killed worker")


@pytest.mark.parametrize("stage", ["encode", "prefill", "decode"])
def test_sigterm_of_any_worker_drains_it_and_loses_nothing(served, undisturbed, stage):
    wait_until(lambda: _two_per_stage(served), 60, message="two workers per stage")
    victims: list = []
    left_discovery_alive: list[bool] = []

    def terminate(progress: list[int]) -> None:
        # a decode victim holds streams when it is told to stop; the other stages' hold work briefly
        victim = (wait_until(lambda: _busy(served, "decode"), 60, message="a decode worker holding streams")[0]
                  if stage == "decode" else served.workers(stage)[0])
        victims.append(victim)
        os.kill(victim.pid, signal.SIGTERM)
        wait_until(lambda: victim.address not in [w.address for w in served.workers(stage)], 30,
                   message="the terminated worker to leave discovery")
        left_discovery_alive.append(running(victim.pid))

    results = asyncio.run(_run_load(served, terminate))
    _assert_nothing_lost(results, undisturbed)
    wait_until(lambda: not running(victims[0].pid), 60, message="the drained worker to exit")
    if stage == "decode":  # it held streams: it left discovery first and finished them before exiting
        assert left_discovery_alive == [True]


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_requests_routed_to_a_worker_killed_before_their_first_token_are_retried(served, stage):
    wait_until(lambda: _two_per_stage(served, (stage,)), 60, message=f"two {stage} workers")
    retried = _recoveries(served, "retry")
    # The worker the router picks first (least loaded, by the planner's own rule), killed: its
    # record stays in discovery until the TTL runs out, so the next requests are sent to it.
    rank = {"prefill": lambda w: (w.load.outstanding_tokens, w.address),
            "decode": decode_rank}[stage]
    victim = min(served.workers(stage), key=rank)
    os.kill(victim.pid, signal.SIGKILL)

    async def burst() -> list[dict]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            return await asyncio.gather(*(_stream(session, served.base_url, f"Burst {i}", []) for i in range(4)))

    results = asyncio.run(burst())
    assert [(r["errors"], r["tokens"]) for r in results] == [([], TOKENS)] * 4
    assert _recoveries(served, "retry") > retried
