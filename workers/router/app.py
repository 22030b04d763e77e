"""The aiohttp applications: /v1/chat/completions (SSE and not), /v1/models and
/health on the public port; /metrics on its own port (`metrics_app`)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epd.stages import STAGES

from .. import metrics
from ..cache import MetadataStore
from ..messages import TextPart
from ..models import ModelAdapter
from ..redis_connection import connect
from ..registry import Peering, WorkerDirectory
from ..security.api_keys import APIKeys
from ..security.tls import TLSFiles
from ..security.url_guard import URLPolicy
from ..transport.grpc_transport import ChannelPool
from .errors import APIError, bad_request, from_http_exception
from .grpc_stage_client import GrpcStageClient
from .image_cost import ImageCostCheck, ImageLimits
from .images import FetchedImage, ImageFetcher, image_session
from .pipeline import StagePipeline
from .prepare import prepare
from .prompt import PromptEncoder
from .recovery import RecoveringStream
from .request_body import RequestLimits, read_json
from .responses import collect, stream_events
from .routing import RoutePlanner
from .schema import ChatRequest, parse_chat_request

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)  # answered without an API key (probes)


@dataclass(frozen=True)
class RouterConfig:
    model: str
    redis_url: str
    served_model_name: str = ""
    max_images_per_request: int = 8
    default_max_tokens: int = 256
    limits: ImageLimits = field(default_factory=ImageLimits)
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    api_keys: APIKeys = field(default_factory=APIKeys)
    url_policy: URLPolicy = field(default_factory=URLPolicy)
    tls: TLSFiles | None = None  # mutual TLS to the workers
    special_tokens_in_text: bool = False  # let text typed by clients contain control tokens
    max_recoveries: int = 3  # retries / resumes of one request after lost workers

    def __post_init__(self) -> None:
        if self.max_images_per_request < 0 or self.default_max_tokens <= 0:
            raise ValueError("max_images_per_request must be >= 0 and default_max_tokens > 0")
        if self.max_recoveries < 0:
            raise ValueError("max_recoveries must be >= 0")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class Router:
    def __init__(self, config: RouterConfig, adapter: ModelAdapter) -> None:
        self.config = config
        self.adapter = adapter
        self.redis = connect(config.redis_url)
        # only workers of this model with these image-processor settings: they publish both
        self.directory = WorkerDirectory(self.redis, peering=Peering(adapter.model_id, adapter.processor_fingerprint))
        self.channels = ChannelPool(config.tls)
        self.stages = GrpcStageClient(self.channels)
        self.pipeline = StagePipeline(self.directory, MetadataStore(self.redis), self.stages,
                                      RoutePlanner())
        self.recovering = RecoveringStream(self.pipeline, adapter, config.max_recoveries)
        self.encoder = PromptEncoder(adapter, config.special_tokens_in_text)
        self.cost = ImageCostCheck(adapter, config.limits)
        # JSON parsing, image headers and tokenizing run here, never on the event loop.
        self.cpu = ThreadPoolExecutor(2, thread_name_prefix="router-cpu")
        self.session: aiohttp.ClientSession | None = None
        self.created = int(time.time())

    # ---- lifecycle -----------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        self.session = image_session(self.config.url_policy)
        await self.directory.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.directory.stop()
        await self.stages.close()
        await self.channels.close()
        if self.session:
            await self.session.close()
        await self.redis.aclose()
        self.cpu.shutdown(wait=False, cancel_futures=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.request_limits.max_body_bytes,
                              middlewares=[self._errors, self._authenticate])
        app.add_routes([web.post("/v1/chat/completions", self.chat_completions), web.get("/v1/models", self.models),
                        web.get("/health", self.health)])
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app

    @staticmethod
    def metrics_app() -> web.Application:
        """Prometheus metrics, served on their own port (kept off the public one)."""
        async def serve_metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.add_routes([web.get("/metrics", serve_metrics)])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return from_http_exception(request.method, request.path, exc).response()
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return APIError(500, "internal error in the router", "internal_error").response()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        keys = self.config.api_keys
        if not keys.required or request.path in OPEN_PATHS or keys.accepts(request.headers.get("Authorization")):
            return await handler(request)
        metrics.REQUESTS.labels("error_401").inc()
        given = "Authorization" in request.headers
        message = ("Incorrect API key provided." if given else
                   "No API key provided: send it as 'Authorization: Bearer <key>'.")
        response = APIError(401, message, "invalid_api_key").response()
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    # ---- endpoints -------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """200 while every stage has a live worker in the router's view; while Redis is away that
        view is the last one read (the router keeps serving from it)."""
        redis = "ok" if self.directory.redis_ok else "unreachable"
        missing = [stage for stage in STAGES if not self.directory.live(stage)]
        if missing:
            return web.json_response({"status": "unavailable", "reason": f"no live {', '.join(missing)} worker",
                                      "redis": redis}, status=503)
        return web.json_response({"status": "ok", "redis": redis,
                                  "workers": {s: len(self.directory.live(s)) for s in STAGES}})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.config.name, "object": "model", "created": self.created, "owned_by": "epd-serve",
             "max_model_len": self.adapter.max_context}]})

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
        except (asyncio.CancelledError, ConnectionResetError):  # the client left; the stages were told to cancel
            # (a stream's write to it can fail before aiohttp cancels the handler)
            metrics.REQUESTS.labels("cancelled").inc()
            raise
        finally:
            metrics.ROUTER_IN_FLIGHT.dec()

    async def _chat(self, request: web.Request, start: float) -> web.StreamResponse:
        chat = parse_chat_request(await read_json(request, self.config.request_limits, self.cpu))
        if chat.model != self.config.name:
            raise APIError(404, f"model {chat.model!r} does not exist; this server serves {self.config.name!r}",
                           "model_not_found", "model")
        if len(chat.image_urls) > self.config.max_images_per_request:
            raise bad_request(f"{len(chat.image_urls)} images in the request exceed the limit of "
                              f"{self.config.max_images_per_request}", "too_many_images", "messages")
        characters = sum(len(p.text) for m in chat.messages for p in m.parts if isinstance(p, TextPart))
        if not self.encoder.fits(characters):
            raise APIError(400, f"the messages hold {characters} characters of text, more than the model's context "
                                f"of {self.adapter.max_context} tokens can take", "context_length_exceeded",
                           "messages")
        images = await self._images(chat)
        loop = asyncio.get_running_loop()
        # prompt blocks hashed at the prefill workers' KV block size, as they publish it
        prepared = await loop.run_in_executor(self.cpu, prepare, self.adapter, self.encoder, chat, images,
                                              self.config.default_max_tokens, self.directory.block_size())
        metrics.IMAGES.inc(len(images))
        metrics.PROMPT_TOKENS.inc(len(prepared.input_ids))
        stream = self.recovering.run(prepared)
        try:
            try:
                first = await stream.__anext__()  # errors before the first token become plain HTTP errors
            except StopAsyncIteration:
                raise APIError(500, "decode ended without producing a token", "decode_failed") from None
            metrics.TTFT.observe(time.perf_counter() - start)
            if chat.stream:
                return await stream_events(request, self.config.name, prepared, first, stream, start)
            return await collect(self.config.name, prepared, first, stream, start)
        finally:
            await stream.aclose()  # a client that left cancels the request at the stages

    async def _images(self, chat: ChatRequest) -> list[FetchedImage]:
        assert self.session is not None, "image fetches start after on_startup"
        fetcher = ImageFetcher(self.config.limits, self.session, self.config.url_policy, self.cost)
        raw = await asyncio.gather(*(fetcher.fetch(url, param) for url, param in chat.image_urls))

        def inspect_all() -> list[FetchedImage]:
            return [fetcher.inspect(data, param) for data, (_, param) in zip(raw, chat.image_urls, strict=True)]

        return await asyncio.get_running_loop().run_in_executor(self.cpu, inspect_all)
