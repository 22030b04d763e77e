"""Writing a completion to the client: one JSON body, or server-sent events."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .. import metrics
from .errors import APIError
from .prepare import PreparedRequest
from .recovery import Completion


class TokenClock:
    """Inter-token latency and end-to-end time of one request, into the router's histograms."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.previous = time.perf_counter()
        self.tokens = 0

    def tick(self, chunk: Completion) -> None:
        now = time.perf_counter()
        if self.tokens:
            metrics.TPOT.observe(now - self.previous)
        self.previous = now
        self.tokens += len(chunk.token_ids)

    def done(self) -> None:
        metrics.E2E.observe(time.perf_counter() - self.start)
        metrics.COMPLETION_TOKENS.inc(self.tokens)


async def collect(model: str, prepared: PreparedRequest, first: Completion, stream: AsyncIterator[Completion],
                  start: float) -> web.Response:
    clock = TokenClock(start)
    clock.tick(first)
    text, last = [first.text], first
    async for chunk in stream:
        clock.tick(chunk)
        text.append(chunk.text)
        last = chunk
    clock.done()
    return web.json_response({
        "id": prepared.request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                     "finish_reason": last.finish_reason or "length", "logprobs": None}],
        "usage": usage(prepared, clock.tokens)})


async def stream_events(request: web.Request, model: str, prepared: PreparedRequest, first: Completion,
                        stream: AsyncIterator[Completion], start: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    created = int(time.time())

    def event(delta: dict, finish: str | None = None, totals: dict | None = None) -> bytes:
        payload = {"id": prepared.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [] if totals else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]}
        if totals:
            payload["usage"] = totals
        return f"data: {json.dumps(payload)}\n\n".encode()

    await response.write(event({"role": "assistant", "content": ""}))
    clock, chunk = TokenClock(start), first
    try:
        while True:
            clock.tick(chunk)
            await response.write(event({"content": chunk.text} if chunk.text else {}, chunk.finish_reason or None))
            if chunk.finish_reason:
                break
            chunk = await stream.__anext__()
    except StopAsyncIteration:
        await response.write(event({}, "length"))
    except APIError as exc:
        metrics.REQUESTS.labels(f"error_{exc.status}_mid_stream").inc()
        await response.write(exc.sse())
    clock.done()
    if prepared.chat.include_usage:
        await response.write(event({}, totals=usage(prepared, clock.tokens)))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def usage(prepared: PreparedRequest, completion: int) -> dict:
    prompt = prepared.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": prepared.cached_tokens}}
