"""The aiohttp application: /v1/chat/completions (SSE and not), /v1/models,
/health and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import metrics
from ..cache import MetadataStore
from ..models import ModelAdapter
from ..registry import STAGES, WorkerDirectory
from ..transport import ChannelPool
from .errors import APIError, bad_request
from .images import FetchedImage, ImageFetcher, ImageLimits
from .pipeline import PreparedRequest, StagePipeline, prepare
from .prefix_affinity import PrefixAffinity
from .routing import RoutePlanner
from .schema import ChatRequest, parse_chat_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    model: str
    redis_url: str
    served_model_name: str = ""
    max_images_per_request: int = 8
    default_max_tokens: int = 256
    limits: ImageLimits = ImageLimits()
    prefix_block_size: int = 16  # the prefill workers' prefix-cache block size

    def __post_init__(self) -> None:
        if self.max_images_per_request < 0 or self.default_max_tokens <= 0 or self.prefix_block_size <= 0:
            raise ValueError("max_images_per_request must be >= 0, default_max_tokens and prefix_block_size > 0")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class Router:
    def __init__(self, config: RouterConfig, adapter: ModelAdapter) -> None:
        self.config = config
        self.adapter = adapter
        self.redis = aioredis.from_url(config.redis_url)
        self.directory = WorkerDirectory(self.redis)
        self.channels = ChannelPool()
        self.pipeline = StagePipeline(self.directory, MetadataStore(self.redis), self.channels,
                                      RoutePlanner(affinity=PrefixAffinity(config.prefix_block_size)))
        self.session: aiohttp.ClientSession | None = None
        self.created = int(time.time())

    # ---- lifecycle -----------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession()
        await self.directory.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.directory.stop()
        await self.channels.close()
        if self.session:
            await self.session.close()
        await self.redis.aclose()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._errors])
        app.add_routes([web.post("/v1/chat/completions", self.chat_completions), web.get("/v1/models", self.models),
                        web.get("/health", self.health), web.get("/metrics", self.metrics)])
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status == 404:
                return APIError(404, f"no route for {request.method} {request.path}", "not_found").response()
            if exc.status == 405:
                return APIError(405, f"method {request.method} not allowed on {request.path}",
                                "method_not_allowed").response()
            raise

    # ---- endpoints -------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        missing = [stage for stage in STAGES if not self.directory.live(stage)]
        if not self.directory.redis_ok:
            return web.json_response({"status": "unavailable", "reason": "Redis is unreachable"}, status=503)
        if missing:
            return web.json_response({"status": "unavailable", "reason": f"no live {', '.join(missing)} worker"},
                                     status=503)
        return web.json_response({"status": "ok", "workers": {s: len(self.directory.live(s)) for s in STAGES}})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.config.name, "object": "model", "created": self.created, "owned_by": "epd-serve",
             "max_model_len": self.adapter.max_context}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        metrics.ROUTER_IN_FLIGHT.inc()
        start = time.perf_counter()
        try:
            response = await self._chat(request, start)
            metrics.REQUESTS.labels("ok").inc()
            return response
        except APIError as exc:
            metrics.REQUESTS.labels(f"error_{exc.status}").inc()
            raise
        finally:
            metrics.ROUTER_IN_FLIGHT.dec()

    async def _chat(self, request: web.Request, start: float) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from exc
        chat = parse_chat_request(body)
        if chat.model != self.config.name:
            raise APIError(404, f"model {chat.model!r} does not exist; this server serves {self.config.name!r}",
                           "model_not_found", "model")
        if len(chat.image_urls) > self.config.max_images_per_request:
            raise bad_request(f"{len(chat.image_urls)} images in the request exceed the limit of "
                              f"{self.config.max_images_per_request}", "too_many_images", "messages")
        images = await self._fetch_images(chat)
        try:
            prepared = prepare(self.adapter, chat, images, self.config.default_max_tokens,
                               self.config.prefix_block_size)
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from exc
        metrics.IMAGES.inc(len(images))
        metrics.PROMPT_TOKENS.inc(len(prepared.input_ids))
        stream = self.pipeline.run(prepared)
        try:
            first = await stream.__anext__()  # errors before the first token become plain HTTP errors
        except StopAsyncIteration:
            raise APIError(500, "decode ended without producing a token", "decode_failed") from None
        except BaseException:
            await stream.aclose()
            raise
        metrics.TTFT.observe(time.perf_counter() - start)
        if chat.stream:
            return await self._stream(request, prepared, first, stream, start)
        return await self._collect(prepared, first, stream, start)

    async def _fetch_images(self, chat: ChatRequest) -> list[FetchedImage]:
        fetcher = ImageFetcher(self.config.limits, self.session)
        return list(await asyncio.gather(*(fetcher.fetch(url, param) for url, param in chat.image_urls)))

    async def _collect(self, prepared: PreparedRequest, first, stream, start: float) -> web.Response:
        text, last, count = [first.text], first, 1
        previous = time.perf_counter()
        async for chunk in stream:
            now = time.perf_counter()
            metrics.TPOT.observe(now - previous)
            previous = now
            text.append(chunk.text)
            last, count = chunk, count + 1
        metrics.E2E.observe(time.perf_counter() - start)
        metrics.COMPLETION_TOKENS.inc(count)
        return web.json_response({
            "id": prepared.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.config.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": last.finish_reason or "length", "logprobs": None}],
            "usage": _usage(prepared, count)})

    async def _stream(self, request: web.Request, prepared: PreparedRequest, first, stream,
                      start: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())

        def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
            payload = {"id": prepared.request_id, "object": "chat.completion.chunk", "created": created,
                       "model": self.config.name,
                       "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                     "logprobs": None}]}
            if usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n".encode()

        await response.write(event({"role": "assistant", "content": ""}))
        count, chunk, previous = 0, first, time.perf_counter()
        try:
            while True:
                count += 1
                await response.write(event({"content": chunk.text} if chunk.text else {}, chunk.finish_reason or None))
                if chunk.finish_reason:
                    break
                chunk = await stream.__anext__()
                now = time.perf_counter()
                metrics.TPOT.observe(now - previous)
                previous = now
        except StopAsyncIteration:
            await response.write(event({}, "length"))
        except APIError as exc:
            metrics.REQUESTS.labels(f"error_{exc.status}_mid_stream").inc()
            await response.write(exc.sse())
        finally:
            await stream.aclose()
        metrics.E2E.observe(time.perf_counter() - start)
        metrics.COMPLETION_TOKENS.inc(count)
        if prepared.chat.include_usage:
            await response.write(event({}, usage=_usage(prepared, count)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _usage(prepared: PreparedRequest, completion: int) -> dict:
    prompt = len(prepared.input_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": prepared.cached_tokens}}
