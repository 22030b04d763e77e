"""Worker discovery through Redis, the same on one machine and in a cluster.

Each worker keeps a record `epd:worker:<stage>:<address>` alive with a short
TTL and refreshes its published load on every heartbeat; a worker that stops
heartbeating drops out of routing within `ttl` seconds. The router reads the
live set."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

KEY_PREFIX = "epd:worker:"
STAGES = ("encode", "prefill", "decode")


@dataclass(frozen=True)
class WorkerLoad:
    queue: int = 0  # items/requests waiting
    in_flight: int = 0
    outstanding_tokens: int = 0  # prefill: prompt tokens admitted but not yet prefilled
    kv_usage: float = 0.0  # decode: fraction of KV capacity in use


@dataclass(frozen=True)
class WorkerInfo:
    stage: str
    address: str  # host:port of the gRPC server
    model: str
    capacity: int
    metrics_url: str = ""
    pid: int = 0
    load: WorkerLoad = field(default_factory=WorkerLoad)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "WorkerInfo":
        data = json.loads(raw)
        return cls(**{**data, "load": WorkerLoad(**data.get("load", {}))})


class WorkerRegistration:
    """Keeps one worker's records alive (one per stage it serves) until stopped."""

    def __init__(self, client: aioredis.Redis, infos: list[WorkerInfo], load: Callable[[], WorkerLoad],
                 ttl: float = 5.0, interval: float = 1.0) -> None:
        self.client = client
        self.infos = infos
        self.load = load
        self.ttl = ttl
        self.interval = interval
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run())

    async def beat(self) -> None:
        load = self.load()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for info in self.infos:
                    record = WorkerInfo(**{**asdict(info), "load": load})
                    pipe.set(KEY_PREFIX + f"{info.stage}:{info.address}", record.to_json(), px=int(self.ttl * 1000))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("heartbeat to Redis failed: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # periodic heartbeat, not synchronisation
            try:
                await self.beat()
            except Exception:  # a heartbeat loop that dies silently would drop the worker from routing
                log.exception("heartbeat failed")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            await self.client.delete(*[KEY_PREFIX + f"{i.stage}:{i.address}" for i in self.infos])
        except (RedisError, OSError):
            pass


class WorkerDirectory:
    """The router's view of live workers, refreshed from Redis in the background."""

    def __init__(self, client: aioredis.Redis, interval: float = 0.5) -> None:
        self.client = client
        self.interval = interval
        self.workers: dict[str, list[WorkerInfo]] = {stage: [] for stage in STAGES}
        self.redis_ok = False
        self._task: asyncio.Task | None = None

    async def refresh(self) -> dict[str, list[WorkerInfo]]:
        found: dict[str, list[WorkerInfo]] = {stage: [] for stage in STAGES}
        try:
            keys = [k async for k in self.client.scan_iter(match=KEY_PREFIX + "*", count=500)]
            values = await self.client.mget(keys) if keys else []
            self.redis_ok = True
        except (RedisError, OSError) as exc:
            log.warning("cannot read workers from Redis: %s", exc)
            self.redis_ok = False
            return self.workers
        for raw in values:
            if raw:
                info = WorkerInfo.from_json(raw)
                found.setdefault(info.stage, []).append(info)
        for stage in found:
            found[stage].sort(key=lambda info: info.address)
        self.workers = found
        return found

    def live(self, stage: str) -> list[WorkerInfo]:
        return self.workers.get(stage, [])

    def is_live(self, address: str) -> bool:
        return any(info.address == address for infos in self.workers.values() for info in infos)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # periodic refresh, not synchronisation
            await self.refresh()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
