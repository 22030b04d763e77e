"""`epd serve` through its public API: the official openai client, 32
concurrent streams, the multimodal cache and its fallbacks, and bad input."""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import subprocess
import threading

import aiohttp
import openai
import pytest

from ..conftest import wait_until
from .harness import chat_body, data_url, png_bytes, running, start_serve

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def served(redis_server):
    server = start_serve(MODEL, redis_server, "--encode", "2", "--quiet",
                         "--router-arg=--max-images-per-request=4", "--router-arg=--max-image-bytes=200000",
                         "--router-arg=--max-image-pixels=250000", "--router-arg=--image-fetch-timeout=2",
                         "--router-arg=--allow-private-image-urls")  # the test's image server is on loopback
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url, api_key="unused")


def image_message(text: str, images: list[bytes]) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def test_openai_client_non_streaming_and_streaming_agree(client):
    messages = image_message("What is in this picture?", [png_bytes(48, 40, seed=1)])
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_multi_turn_history_with_images(client):
    image = png_bytes(40, 40, seed=3)
    messages = [{"role": "system", "content": "Be brief."}, *image_message("Describe it.", [image]),
                {"role": "assistant", "content": "A picture."}, *image_message("And this one?", [image])]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 5


def test_32_concurrent_streams_complete_without_mixing(served):
    prompts = [(f"Request number {i}: describe.", [png_bytes(32 + i, 32, seed=200 + i)] if i % 2 else [])
               for i in range(32)]

    async def one(session, text, images, stream):
        body = chat_body(MODEL, text, images, max_tokens=10, stream=stream,
                         **({"stream_options": {"include_usage": True}} if stream else {}))
        async with session.post(served.base_url + "/chat/completions", json=body) as response:
            assert response.status == 200
            if not stream:
                return await response.json()
            events = [line[6:] async for line in _lines(response) if line.startswith("data: ")]
            return events

    async def run():
        async with aiohttp.ClientSession() as session:
            streams = await asyncio.gather(*(one(session, t, imgs, True) for t, imgs in prompts))
            singles = [await one(session, t, imgs, False) for t, imgs in prompts[:8]]
            return streams, singles

    import json

    streams, singles = asyncio.run(run())
    for events, single in zip(streams, singles + [None] * 24, strict=True):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len({c["id"] for c in chunks}) == 1  # one request per stream: nothing interleaved
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        token_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role") is None]
        assert len(token_chunks) == 10  # one chunk per token: none lost or duplicated
        assert chunks[-1]["usage"]["completion_tokens"] == 10
        if single is not None:
            assert text == single["choices"][0]["message"]["content"]
    assert served.router_metric("epd_router_in_flight") == 0


async def _lines(response):
    async for raw in response.content:
        line = raw.decode().strip()
        if line:
            yield line


def test_same_image_twice_hits_the_cache_then_survives_losing_it(served, client):
    image = png_bytes(64, 48, seed=42)
    messages = image_message("What is this?", [image])

    def ask() -> str:
        return reply().choices[0].message.content

    def reply():
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})

    miss = reply()
    first = miss.choices[0].message.content
    encoded = served.stage_metric("encode", "epd_encode_items_total")
    hit = reply()
    assert hit.choices[0].message.content == first
    # The prefill prefix cache also skips every full 16-token block of the repeated prompt (the
    # first time, at most the chat template before the new image was cached).
    assert hit.usage.prompt_tokens_details.cached_tokens == (hit.usage.prompt_tokens - 1) // 16 * 16
    assert miss.usage.prompt_tokens_details.cached_tokens < hit.usage.prompt_tokens_details.cached_tokens
    assert served.stage_metric("encode", "epd_encode_items_total") == encoded  # no encode work on a hit

    # Redis flushed: metadata and registrations are gone until the next heartbeat; the request still succeeds.
    served.redis.client().flushall()
    wait_until(lambda: registered(served, encode=2, prefill=1, decode=1), 15, message="re-registration")
    assert ask() == first

    # The encode worker holding the embedding is killed: the request still succeeds (the prefill
    # worker's prefix cache or own LRU, or a recompute on the surviving encode worker, provides it;
    # the recompute path alone is pinned down by the next test).
    owner = served.redis.client().hget(_record_key(served, image), "owner").decode()
    victim = next(w for w in served.workers("encode") if w.address == owner)
    os.kill(victim.pid, signal.SIGKILL)
    assert ask() == first
    # an encode the router dispatched may still be finishing (prefill found the image in its prefix
    # cache and did not wait for it); once done, nothing stays pending
    wait_until(lambda: served.pending_cache_keys() == [], 30, message="no pending cache records")


def prefill_one_image(served, request_id: str, text: str, image: bytes, size: tuple[int, int], item_key: str,
                      dispatched: bool):
    """Send a one-image prompt straight to the prefill worker (as the router would, with the
    image's single item given by hand), then drain its tokens from decode."""
    import grpc

    from epd.image_size import ImageSize
    from epd.v1 import stages_pb2 as pb
    from epd.v1 import stages_pb2_grpc as pb_grpc
    from epd.workers.messages import ChatMessage, ImagePart, TextPart

    ids = model_adapter().build_prompt([ChatMessage("user", (ImagePart(0), TextPart(text)))], [ImageSize(*size)])
    ref = pb.ImageRef(image_key=image_key_of(image), image=image, width=size[0], height=size[1],
                      items=[pb.EncodeItem(item_key=item_key, tile_index=-1, n_tokens=16, dispatched=dispatched)])
    wait_until(lambda: registered(served, prefill=1, decode=1), 15, message="prefill and decode registered")
    prefill, decode = served.workers("prefill")[0], served.workers("decode")[0]
    with grpc.insecure_channel(prefill.address) as channel:
        reply = pb_grpc.PrefillServiceStub(channel).Prefill(
            pb.PrefillRequest(request_id=request_id, input_ids=ids, images=[ref], decode_address=decode.address,
                              sampling=pb.SamplingParams(max_tokens=1)), timeout=60)
    with grpc.insecure_channel(decode.address) as channel:
        chunks = list(pb_grpc.DecodeServiceStub(channel).Generate(pb.GenerateRequest(request_id=request_id),
                                                                  timeout=60))
    return ids, reply, chunks


def model_adapter():
    from epd.workers.models import load_adapter

    return load_adapter(MODEL)


def image_key_of(image: bytes) -> str:
    from epd.workers.cache import image_key

    adapter = model_adapter()
    return image_key(adapter.model_id, adapter.processor_fingerprint, image)


def test_prefill_recomputes_an_embedding_whose_owner_is_gone(served):
    """Deterministic fallback chain: not in the prefill buffer, the Redis record points at a dead
    owner, so prefill re-encodes the image on a live encode worker."""
    # the encode worker an earlier test killed is back: both records are those of live processes
    wait_until(lambda: len(encode := served.workers("encode")) == 2 and all(running(w.pid) for w in encode), 30,
               message="both encode workers live")
    image = png_bytes(44, 36, seed=4242)
    key = image_key_of(image)
    served.redis.client().hset("epd:mm:" + key, mapping={"owner": "127.0.0.1:1", "n_tokens": 16, "hidden": 64,
                                                          "dtype": "float32", "bytes": 4096, "state": "ready",
                                                          "created": 0})
    recomputed = served.stage_metric("prefill", "epd_mm_cache_events_total", event="recompute")
    _, reply, chunks = prefill_one_image(served, "recompute-1", "Hi", image, (44, 36), key, dispatched=False)
    assert (reply.items.recomputed, reply.items.fetched, reply.items.from_buffer) == (1, 0, 0)
    assert chunks[-1].finish_reason == "length" and chunks[0].token_ids[0] == reply.first_token
    assert served.stage_metric("prefill", "epd_mm_cache_events_total", event="recompute") == recomputed + 1
    assert served.redis.client().hget("epd:mm:" + key, "owner").decode() != "127.0.0.1:1"  # re-announced


def test_prefill_needs_no_embedding_for_an_image_inside_a_cached_prefix(served, client):
    """An image whose placeholders all lie in the cached prompt prefix is not waited for: here its
    only item is announced as dispatched but never pushed, and prefill answers from the cache."""
    image, text = png_bytes(52, 44, seed=5151), "Please describe every detail of this picture. " * 3
    client.chat.completions.create(model=MODEL, messages=image_message(text, [image]), max_tokens=2)
    ids, reply, chunks = prefill_one_image(served, "prefix-only-1", text, image, (52, 44), "never-pushed",
                                           dispatched=True)
    assert (reply.items.from_buffer, reply.items.fetched, reply.items.recomputed) == (0, 0, 0)
    assert reply.cached_tokens == (len(ids) - 1) // 16 * 16 > ids.index(model_adapter().image_token_id) + 16
    assert chunks[-1].finish_reason == "length"


def registered(served, **counts: int) -> bool:
    """Each named stage has this many registry records (they come back within a heartbeat of a flush)."""
    return all(len(served.workers(stage)) == n for stage, n in counts.items())


def _record_key(served, image: bytes) -> str:
    return "epd:mm:" + image_key_of(image)


HTTP_IMAGE = png_bytes(40, 36, seed=77)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves /image.png; everything else is 404."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        if self.path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(HTTP_IMAGE)))
            self.end_headers()
            self.wfile.write(HTTP_IMAGE)
            return
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_404():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/missing.png"
    server.shutdown()


def solid_png(width: int, height: int) -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, "PNG")
    return buffer.getvalue()


def test_image_from_an_http_url_equals_the_same_image_inline(client, http_404):
    url = http_404.replace("/missing.png", "/image.png")

    def ask(image_url: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                 {"type": "text", "text": "What is it?"}]}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
        return reply.choices[0].message.content

    assert ask(url) == ask(data_url(HTTP_IMAGE))


def bad_cases(http_404: str) -> list[tuple[str, object, int, str, str]]:
    ok_image = png_bytes(32, 32, seed=9)
    big_pixels = solid_png(600, 500)  # 300,000 px > 250,000 limit, few bytes
    return [
        ("malformed JSON", b"{not json", 400, "invalid_json", "not valid JSON"),
        ("unknown model", {**chat_body("no-such-model", "hi", [])}, 404, "model_not_found", "no-such-model"),
        ("data URL not an image", {**chat_body(MODEL, "hi", []), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}]}]},
         400, "invalid_image", "not an image"),
        ("corrupt image bytes", chat_body(MODEL, "hi", [b"\x89PNG\r\n\x1a\n" + b"\0" * 64]), 400, "invalid_image",
         "not a valid image"),
        ("too many images", chat_body(MODEL, "hi", [ok_image] * 5), 400, "too_many_images", "limit of 4"),
        ("image over the byte limit", chat_body(MODEL, "hi", [b"\0" * 300_000]), 400, "image_too_large", "bytes"),
        ("image over the pixel limit", chat_body(MODEL, "hi", [big_pixels]), 400, "image_too_large", "pixels"),
        ("prompt longer than the context", chat_body(MODEL, "hello " * 5000, []), 400, "context_length_exceeded",
         "context"),
        ("max_tokens <= 0", chat_body(MODEL, "hi", [], max_tokens=0), 400, "invalid_request", "max_tokens"),
        ("unreachable image URL", {**chat_body(MODEL, "hi", []), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": http_404}}]}]}, 400, "image_url_unreachable", "404"),
    ]


def test_bad_input_gets_openai_errors_and_leaves_nothing_behind(served, http_404):
    async def send(body):
        async with aiohttp.ClientSession() as session:
            data = body if isinstance(body, bytes) else None
            kwargs = {"data": data, "headers": {"Content-Type": "application/json"}} if data else {"json": body}
            async with session.post(served.base_url + "/chat/completions", **kwargs) as response:
                return response.status, await response.json()

    for name, body, status, code, fragment in bad_cases(http_404):
        got_status, payload = asyncio.run(send(body))
        assert (got_status, payload["error"]["code"]) == (status, code), name
        assert fragment in payload["error"]["message"], (name, payload)
        assert payload["error"]["type"] == "invalid_request_error"
    assert asyncio.run(send(chat_body(MODEL, "still serving?", [])))[0] == 200
    assert served.router_metric("epd_router_in_flight") == 0
    for stage in ("encode", "prefill", "decode"):
        assert served.stage_metric(stage, "epd_stage_in_flight") == 0, stage
    assert served.pending_cache_keys() == []


def test_epd_bench_writes_its_json_summary(served, tmp_path):
    import json

    from epd.workers.launcher.processes import epd_command

    out = tmp_path / "bench.json"
    result = subprocess.run(epd_command("bench", "--base-url", served.base_url, "--requests", "6", "--rate", "20",
                                        "--images-per-request", "2", "--image-size", "48x40", "--max-tokens", "4",
                                        "--slo-ttft", "60", "--slo-tpot", "10", "--no-progress", "--out", str(out)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert (summary["requests"], summary["completed"], summary["errors"]) == (6, 6, 0)
    assert summary["slo_attainment"] == 1.0 and summary["goodput_rps"] > 0
    assert set(summary["ttft_s"]) == {"p50", "p90", "p99", "mean"}
    assert summary["workload"]["images_per_request"] == 2
    bad = subprocess.run(epd_command("bench", "--base-url", served.base_url, "--image-size", "big",
                                     "--out", str(out)), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "WIDTHxHEIGHT" in bad.stderr


def test_workers_split_the_machines_cores_and_bad_thread_counts_are_refused(served):
    """Four workers on one machine get an even share of its cores each (torch's default would
    give every one of them all cores, oversubscribing the CPU) and run every forward on all of their
    share (no --small-step-tokens: on an AVX2 host one thread lost); negative counts exit 2."""
    from epd.workers.launcher.processes import epd_command

    def live_workers() -> list:
        workers = [w for stage in ("encode", "prefill", "decode") for w in served.workers(stage)]
        return workers if len(workers) == 4 and all(os.path.exists(f"/proc/{w.pid}") for w in workers) else []

    workers = wait_until(live_workers, 60, message="the four workers registered and running")
    share = str(max(1, len(os.sched_getaffinity(0)) // len(workers)))
    for worker in workers:
        with open(f"/proc/{worker.pid}/cmdline") as cmdline:
            argv = cmdline.read().split("\0")
        assert argv[argv.index("--torch-threads") + 1] == share, argv
        assert not any(arg.startswith("--small-step-tokens") for arg in argv), argv
    for command, flag in (("serve", "--worker-threads"), ("worker", "--torch-threads"),
                          ("worker", "--small-step-tokens")):
        bad = subprocess.run(epd_command(command, *(("--role", "encode") if command == "worker" else ()),
                                         f"{flag}=-1"), capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and f"{flag} must be >= 0, got -1" in bad.stderr, bad.stderr
