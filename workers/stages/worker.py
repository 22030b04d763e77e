"""One worker process: loads only its stage's part of the model, serves the
stage over grpc.aio (with the standard health service; mutual TLS and
reflection when asked for; a drain on SIGTERM),
exposes /metrics, and registers itself in Redis with a heartbeat."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Literal

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..cache import MetadataStore
from ..drain import ActiveCalls, drain, until_signalled
from ..engine import ATTENTION_BACKENDS, DecodeEngine, KVCacheConfig, PrefillEngine, build_runtime
from ..engine.compiled import compiles
from ..engine.mixed import DEFAULT_STEP_TOKENS
from ..engine.step_threads import StepThreads
from ..engine.thread_teams import pin_threads, pinned_executor
from ..models import ModelAdapter, load_adapter
from ..redis_connection import connect
from ..registry import Peering, WorkerDirectory, WorkerInfo, WorkerLoad, WorkerRegistration
from ..security.tls import TLSFiles, bind, plaintext_health_server
from ..transport.cuda_ipc import export_handle
from ..transport.grpc_transport import CHANNEL_OPTIONS, ChannelPool
from ..transport.kv_paths import PATHS, host_id, nixl_available, parse_paths
from ..transport.kv_receiver import TcpEndpoint
from ..transport.nixl_path import NixlAgent
from ..transport.shm import SharedPool
from .colocated import ColocatedScheduler
from .context import WorkerContext
from .decode import DecodeServicer
from .encode import EncodeServicer
from .prefill import PrefillServicer

log = logging.getLogger(__name__)

Role = Literal["encode", "prefill", "decode", "colocated"]
INCARNATION = uuid.uuid4().hex  # this process's discovery records carry it
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROLES: tuple[Role, ...] = ("encode", "prefill", "decode", "colocated")


@dataclass(frozen=True)
class WorkerConfig:
    role: Role
    model: str
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str = ""  # address peers use (the pod's stable DNS name in Kubernetes)
    metrics_port: int = 0
    device: str = "cpu"
    encode_max_batch: int = 16
    # 0: a batch is whatever is queued when the tower is free (batches form while the previous one runs);
    # waiting for more only delays a lone request's first token
    encode_max_wait: float = 0.0
    prefill_token_budget: int = 8192  # tokens per prefill step; longer prompts are chunked
    step_token_budget: int = DEFAULT_STEP_TOKENS  # colocated: tokens per mixed step, decode rows first
    decode_max_batch: int = 64
    decode_max_kv_tokens: int = 1 << 20
    cache_bytes: int = 1 << 30
    cache_ttl: int = 3600
    kv_cache_bytes: int = 0  # the paged KV pool; 0: 1 GiB on CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9
    block_size: int = 16  # tokens per KV block (also the prefix cache's granularity)
    prefix_cache_bytes: int = 1 << 30  # free KV blocks kept as prefill's prefix cache (0 turns it off)
    attention_backend: str = "auto"
    kv_paths: str = ",".join(PATHS)  # KV data paths this worker may use (grpc is always one)
    kv_tcp_port: int = 0  # decode: the tcp KV path's port (0: any free port)
    enforce_eager: bool = False  # no decode CUDA graphs (CUDA), no compiled layers (CPU, 16-bit weights)
    compile_float32: bool = False  # CPU: float32 layers compiled too (faster; no longer exact against generate)
    small_step_tokens: int = 0  # CPU: forwards of at most this many tokens run on one thread (0: never)
    torch_threads: int = 0  # the engine thread's intra-op threads (0: torch's default, one per core)
    dtype: str = "auto"  # weights and KV: the checkpoint's ("auto"), float32, bfloat16 or float16
    tls: TLSFiles | None = None  # mutual TLS: serve with client certificates required, call peers with it
    grpc_reflection: bool = False
    health_port: int = 0  # > 0: also serve gRPC health alone, without TLS, here (for kubelet probes)
    drain_timeout: float = 25.0  # on SIGTERM: seconds to finish the calls held (below the pod's grace period)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        for name in ("encode_max_batch", "prefill_token_budget", "step_token_budget", "decode_max_batch",
                     "decode_max_kv_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.role == "colocated" and self.step_token_budget <= self.decode_max_batch:
            raise ValueError(f"step_token_budget ({self.step_token_budget}) must exceed decode_max_batch "
                             f"({self.decode_max_batch}): a full decode batch would leave prefill no room")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}")
        _ = self.kv_cache  # building it validates the KV settings
        StepThreads(self.small_step_tokens)  # validates it
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0: one per core), got {self.torch_threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_paths(self.kv_paths)
        if not 0 <= self.kv_tcp_port <= 65535:
            raise ValueError(f"kv_tcp_port must be a port number (0: any free one), got {self.kv_tcp_port}")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype == "auto" else getattr(torch, self.dtype)

    @property
    def kv_cache(self) -> KVCacheConfig:
        return KVCacheConfig(capacity_bytes=self.kv_cache_bytes, block_size=self.block_size,
                             prefix_cache_bytes=self.prefix_cache_bytes,
                             gpu_memory_utilization=self.gpu_memory_utilization, attention=self.attention_backend)

    @property
    def stages(self) -> tuple[str, ...]:
        return ("encode", "prefill", "decode") if self.role == "colocated" else (self.role,)


class Worker:
    """One worker process's servers and loops; `start()` returns once it serves and is registered."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.servicers: list = []
        self.scheduler: ColocatedScheduler | None = None
        self.health = health.aio.HealthServicer()

    async def start(self) -> None:
        config = self.config
        adapter = load_adapter(config.model)
        self.calls = ActiveCalls()
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[self.calls])
        port = bind(self.server, f"{config.host}:{config.port}", config.tls)
        address = config.advertise or f"{config.host}:{port}"
        self.redis = connect(config.redis_url)
        self.ctx = ctx = WorkerContext(address=address, adapter=adapter, redis=self.redis,
                                       metadata=MetadataStore(self.redis, config.cache_ttl),
                                       directory=WorkerDirectory(self.redis, peering=peering(config, adapter)),
                                       channels=ChannelPool(config.tls), threads=config.torch_threads,
                                       calls=self.calls)
        self.servicers = await asyncio.get_running_loop().run_in_executor(ctx.executor, _build_servicers, config, ctx)
        self.scheduler = ColocatedScheduler(ctx, *_colocated_stages(self.servicers), config.step_token_budget) \
            if config.role == "colocated" else None
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        for servicer in self.servicers:
            base = type(servicer).__bases__[0].__name__
            getattr(pb_grpc, f"add_{base}_to_server")(servicer, self.server)
            names.append(pb.DESCRIPTOR.services_by_name[base.removesuffix("Servicer")].full_name)
            if isinstance(servicer, DecodeServicer):
                self.server.add_generic_rpc_handlers(servicer.generic_handlers())
            servicer.start()
        if self.scheduler is not None:
            self.scheduler.start()
        if config.grpc_reflection:
            reflection.enable_server_reflection(names, self.server)
        await self.server.start()
        self.health_server = (await plaintext_health_server(self.health, config.host, config.health_port)
                              if config.health_port else None)
        self.metrics_server, _ = start_http_server(config.metrics_port, addr=config.host)
        metrics_url = f"http://{config.host}:{self.metrics_server.server_port}/metrics"
        mailbox = next((s.mailbox.path for s in self.servicers if isinstance(s, PrefillServicer) and s.mailbox), "")
        infos = [published(config, adapter, stage, address, metrics_url, mailbox) for stage in config.stages]
        for info in infos:
            metrics.BATCH_LIMIT.labels(info.stage).set(info.batch_limit)
        self.registration = WorkerRegistration(self.redis, infos, lambda: _load(self.servicers))
        if {"encode", "prefill"} & set(config.stages):
            # prefill recomputes on encode workers it finds here; encode finds prefill's embedding mailbox
            await ctx.directory.start()
        await self.registration.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._withdraw_when_dead())
        log.info("%s worker for %s serving on %s", config.role, config.model, address)
        print(f"EPD_WORKER_READY role={config.role} address={address} metrics={metrics_url}", flush=True)

    async def _withdraw_when_dead(self) -> None:
        """A stage loop died: stop advertising the worker (gRPC health NOT_SERVING, out of
        discovery); the process stays up for its supervisor (a pod's probe) to restart it."""
        await self.ctx.health.dead.wait()
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.registration.stop()
        print(f"EPD_WORKER_NOT_SERVING {self.ctx.health.reason}", flush=True)

    async def stop(self) -> None:
        self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.registration.stop()  # out of discovery first, then finish what is held
        await drain(self.calls, self.config.drain_timeout)
        await self.server.stop(grace=5)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        if self.scheduler is not None:
            await self.scheduler.stop()
        for servicer in self.servicers:
            await servicer.stop()
        await self.ctx.directory.stop()
        await self.ctx.channels.close()
        await self.redis.aclose()
        self.metrics_server.shutdown()
        self.ctx.executor.shutdown(wait=False, cancel_futures=True)


async def serve_worker(config: WorkerConfig) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""
    worker = Worker(confine_teams(config))
    await worker.start()
    await until_signalled()
    await worker.stop()


def confine_teams(config: WorkerConfig) -> WorkerConfig:
    """Make the engine thread this process's only multi-threaded OpenMP team (`engine.thread_teams`): the
    event loop's thread (the caller's) and its default executor run torch ops on one thread; the engine
    thread gets `config.torch_threads`, made explicit here (torch's default when 0) before this thread's
    count drops to one."""
    config = replace(config, torch_threads=config.torch_threads or torch.get_num_threads())
    pin_threads(1)
    asyncio.get_running_loop().set_default_executor(pinned_executor(1, None, "helper"))
    return config


def _build_servicers(config: WorkerConfig, ctx: WorkerContext) -> list:
    adapter = ctx.adapter
    servicers: list = []
    if "encode" in config.stages:
        vision = adapter.load_vision(config.device, config.torch_dtype)
        if compiles(vision.dtype, torch.device(config.device), config.enforce_eager, config.compile_float32):
            start = time.perf_counter()
            if vision.compile():
                log.info("compiled the vision tower and projector in %.1f s", time.perf_counter() - start)
        servicers.append(EncodeServicer(ctx, vision, config.cache_bytes, config.encode_max_batch,
                                        config.encode_max_wait))
    if {"prefill", "decode"} & set(config.stages):
        # One pool per process: colocated prefill and decode share it, as a non-disaggregated server does,
        # and decode adopts the prefill blocks (nothing moves). A decode-only worker on CPU keeps its pool
        # in shared memory, so a prefill worker on the same host writes the KV straight into it.
        paths = parse_paths(config.kv_paths)
        shared = SharedPool() if config.role == "decode" and config.device == "cpu" and "shm" in paths else None
        runtime = build_runtime(adapter.load_language(config.device, config.torch_dtype), config.kv_cache,
                                shared.allocate if shared else None, config.enforce_eager,
                                StepThreads(config.small_step_tokens), config.compile_float32)
        if "prefill" in config.stages:
            prefill = PrefillEngine(runtime.decoder, adapter, runtime.allocator, config.prefill_token_budget)
            servicers.append(PrefillServicer(ctx, prefill, config.cache_bytes, kv_paths=paths))
        if "decode" in config.stages:
            decode = DecodeEngine(runtime.decoder, adapter, runtime.allocator, config.decode_max_batch,
                                  config.decode_max_kv_tokens)
            if runtime.pool.device.type == "cuda" and not config.enforce_eager:
                decode.capture_cuda_graphs()
            ipc = export_handle(runtime.pool.kv) if config.role == "decode" and runtime.pool.device.type == "cuda" \
                and "cuda_ipc" in paths else b""
            nixl = NixlAgent("decode", runtime.pool.kv) if config.role == "decode" and "nixl" in paths \
                and nixl_available() else None
            tcp = TcpEndpoint(config.host, config.kv_tcp_port, config.tls) if config.role == "decode" else None
            servicers.append(DecodeServicer(ctx, decode, shared_fd=shared.fd if shared else None,
                                            cuda_ipc_handle=ipc, kv_paths=paths, nixl=nixl, tcp=tcp))
    return servicers


def _colocated_stages(servicers: list) -> tuple[EncodeServicer | None, PrefillServicer, DecodeServicer]:
    encode = next((s for s in servicers if isinstance(s, EncodeServicer)), None)
    prefill = next(s for s in servicers if isinstance(s, PrefillServicer))
    decode = next(s for s in servicers if isinstance(s, DecodeServicer))
    return encode, prefill, decode


def peering(config: WorkerConfig, adapter: ModelAdapter) -> Peering:
    """The peers this worker works with: its model, with its image-processor settings."""
    return Peering(config.model, adapter.processor_fingerprint)


def published(config: WorkerConfig, adapter: ModelAdapter, stage: str, address: str, metrics_url: str,
              mailbox: str = "") -> WorkerInfo:
    """This worker's discovery record for `stage`: what peers must agree on, read from here rather
    than repeated in their flags (the router hashes prompt blocks at this block size), and where
    prefill takes embeddings in shared memory (`mailbox`: its socket)."""
    batch_limit = {"encode": config.encode_max_batch, "prefill": config.prefill_token_budget,
                   "decode": config.decode_max_batch}[stage]
    return WorkerInfo(stage=stage, address=address, model=config.model, batch_limit=batch_limit,
                      metrics_url=metrics_url, pid=os.getpid(), incarnation=INCARNATION,
                      processor=peering(config, adapter).processor,
                      block_size=config.block_size if stage != "encode" else 0,
                      host_id=host_id() if stage == "prefill" else "",
                      embedding_socket=mailbox if stage == "prefill" else "")


def _load(servicers: list) -> WorkerLoad:
    load = WorkerLoad()
    for s in servicers:
        if isinstance(s, EncodeServicer):
            load = WorkerLoad(queue=s.batcher.depth, in_flight=s.active_requests,
                              outstanding_tokens=load.outstanding_tokens, kv_usage=load.kv_usage)
        elif isinstance(s, PrefillServicer):
            load = WorkerLoad(queue=load.queue + s.queue_depth, in_flight=load.in_flight + s.active_requests,
                              outstanding_tokens=s.outstanding_tokens, kv_usage=load.kv_usage)
        elif isinstance(s, DecodeServicer):
            load = WorkerLoad(queue=load.queue, in_flight=load.in_flight + s.in_flight,
                              outstanding_tokens=load.outstanding_tokens, kv_usage=s.engine.kv_usage)
    return load

