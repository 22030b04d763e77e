"""Greedy output through `epd serve` (separate encode, prefill and decode
processes over gRPC, real Redis) equals `model.generate` of the same model,
for every family, with 0, 1 and 4 images, 8 requests at once, over every KV
path that runs here: shared memory, a TCP connection per handoff and raw gRPC
frames between processes, and in-process adoption in one colocated process.
The embeddings take shared memory alongside the shm KV path, gRPC otherwise."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from epd.workers.messages import ChatMessage, ImagePart, TextPart
from epd.workers.models import load_adapter

from ..engine.reference import image_size, reference_generate
from .harness import chat_body, png_bytes, start_serve

MAX_TOKENS = 10
TEXTS = ["What is shown?", "How many objects are there?", "Describe the image in detail.", "Hello",
         "Red, green, blue.", "The cat sat on the mat.", "One, two, three", "Explain step by step."]


KV_PATHS = {"shm": ("--encode", "2", "--worker-arg=--kv-paths=shm"),
            "grpc": ("--encode", "2", "--worker-arg=--kv-paths=grpc"),
            "tcp": ("--encode", "2", "--worker-arg=--kv-paths=tcp"),
            "nixl": ("--encode", "2", "--worker-arg=--kv-paths=nixl"),  # UCX over shared memory / TCP here
            "inproc": ("--colocated",)}


@pytest.fixture(scope="module", params=[(model, path) for model in ("tiny-llava", "tiny-qwen2-vl", "tiny-llava-next")
                                        for path in KV_PATHS], ids=lambda p: f"{p[0]}-{p[1]}")
def served(request, redis_server):
    model, path = request.param
    server = start_serve(model, redis_server, "--quiet", *KV_PATHS[path])
    server.kv_path = path
    yield server
    server.stop()


def expected_text(model: str, text: str, images: list[bytes]) -> str:
    adapter = load_adapter(model)
    sizes = [image_size(img) for img in images]
    parts = tuple([ImagePart(i) for i in range(len(images))] + [TextPart(text)])
    ids = adapter.build_prompt([ChatMessage("user", parts)], sizes)
    tokens = reference_generate(adapter, _full_model(model), ids, images, MAX_TOKENS)
    return adapter.tokenizer.decode(tokens, skip_special_tokens=True)


_MODELS: dict = {}


def _full_model(model: str):
    if model not in _MODELS:
        _MODELS[model] = load_adapter(model).load_full()
    return _MODELS[model]


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url + "/chat/completions", json=body) as response:
        payload = await response.json()
        assert response.status == 200, payload
        return payload


def test_eight_concurrent_mixed_requests_match_generate(served):
    cases = [(TEXTS[i], [png_bytes(40 + 11 * i + 3 * k, 30 + 5 * k, seed=7 * i + k) for k in range((0, 1, 4)[i % 3])])
             for i in range(8)]

    async def run_all():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(post(session, served.base_url,
                                               chat_body(served.model, text, images, MAX_TOKENS))
                                          for text, images in cases))

    results = asyncio.run(run_all())
    for (text, images), result in zip(cases, results, strict=True):
        assert result["choices"][0]["message"]["content"] == expected_text(served.model, text, images), \
            f"{len(images)} images: {text!r}"
        assert result["usage"]["completion_tokens"] == MAX_TOKENS
        assert result["choices"][0]["finish_reason"] == "length"
    assert sorted({len(images) for _, images in cases}) == [0, 1, 4]
    prefill = served.workers("prefill")[0].metrics_url
    assert served.metric(prefill, "epd_transfer_wait_seconds_count", path=served.kv_path) == len(cases)
    if served.kv_path == "inproc":  # decode adopted the prefill blocks: no KV byte moved
        assert served.metric(prefill, "epd_transfer_bytes_total", kind="kv") == 0
        return
    assert served.metric(prefill, "epd_transfer_bytes_total", kind="kv", path=served.kv_path) > 0
    # intra-request parallelism: the items (images, anyres tiles) were spread over both encode workers
    assert all(served.metric(w.metrics_url, "epd_encode_items_total") > 0 for w in served.workers("encode"))
    # embeddings take shared memory where prefill offers its mailbox (shm allowed), else gRPC
    embedding_path, other = ("shm", "grpc") if served.kv_path == "shm" else ("grpc", "shm")
    pushes = {path: served.stage_metric("encode", "epd_transfer_latency_seconds_count", kind="embedding", path=path)
              for path in (embedding_path, other)}
    assert pushes[embedding_path] > 0 and pushes[other] == 0, pushes
