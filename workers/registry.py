"""Worker discovery through Redis, the same on one machine and in a cluster.

Each worker keeps a record `epd:worker:<stage>:<address>` alive with a short
TTL and refreshes its published load on every heartbeat; a worker that stops
heartbeating drops out of routing within `ttl` seconds. The router reads the
live set. The record also says what peers must agree on, so that nobody
repeats it in a flag: the model and its image-processor settings (part of
every multimodal cache key), the KV block size (the prefix cache's
granularity, which the router's prefix-affinity hashes must use) and the
stage's batch limit."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from epd.stages import STAGES

from .background import cancel_and_wait, periodically

log = logging.getLogger(__name__)

KEY_PREFIX = "epd:worker:"


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
    model: str  # the model id it serves (what the router and the cache keys call it)
    batch_limit: int  # encode: images per batch; prefill: tokens per step; decode: sequences per step
    metrics_url: str = ""
    pid: int = 0
    incarnation: str = ""  # random per process start: a restarted worker on the same address is someone new
    processor: str = ""  # fingerprint of the image-processor settings (ModelAdapter.processor_fingerprint)
    block_size: int = 0  # tokens per KV block, prefill and decode (0: encode, or not published)
    host_id: str = ""  # prefill: the host (and network namespace) it runs on, kv_paths.host_id()
    embedding_socket: str = ""  # prefill: its shared-memory embedding mailbox, for encode workers on that host
    load: WorkerLoad = field(default_factory=WorkerLoad)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerInfo:
        """Parse a record; ValueError if it is not one (anyone who can write to Redis could write it).
        Fields this version does not know are ignored (a newer worker during a rolling update)."""
        try:
            data = json.loads(raw)
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            info = cls(**{**known, "load": WorkerLoad(**data.get("load", {}))})
        except (TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed worker record: {exc}") from exc
        host, sep, port = info.address.rpartition(":")
        if info.stage not in STAGES or not sep or not host or not port.isdigit():
            raise ValueError(f"malformed worker record: stage {info.stage!r}, address {info.address!r}")
        return info


class WorkerRegistration:
    """Keeps one worker's records alive (one per stage it serves) until stopped."""

    def __init__(self, client: aioredis.Redis, infos: list[WorkerInfo], load: Callable[[], WorkerLoad],
                 ttl: float = 5.0, interval: float = 1.0) -> None:
        self.client = client
        self.infos = infos
        self.load = load
        self.ttl = ttl
        self.interval = interval
        self.registered = False  # the last heartbeat reached Redis
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(periodically(self.interval, self.beat, "heartbeat"))

    async def beat(self) -> None:
        """Write the records; while Redis is away the worker keeps serving and re-registers on its return."""
        load = self.load()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for info in self.infos:
                    record = WorkerInfo(**{**asdict(info), "load": load})
                    pipe.set(KEY_PREFIX + f"{info.stage}:{info.address}", record.to_json(), px=int(self.ttl * 1000))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            if self.registered:
                log.warning("heartbeat to Redis failed (%s); serving on, re-registering when it is back", exc)
            self.registered = False
            return
        if not self.registered:
            log.info("registered in Redis as %s", ", ".join(f"{i.stage} {i.address}" for i in self.infos))
        self.registered = True

    async def stop(self) -> None:
        """Stop heartbeating and delete the records: peers stop choosing this worker. The loop has ended
        before the delete, so no heartbeat in flight can write a record back."""
        await cancel_and_wait(self._task)
        try:
            await self.client.delete(*[KEY_PREFIX + f"{i.stage}:{i.address}" for i in self.infos])
        except (RedisError, OSError):
            pass


@dataclass(frozen=True)
class Peering:
    """What a worker must publish to be a peer of this process: the same model, with the same
    image-processor settings (else the multimodal cache keys of the two would mean different things)."""

    model: str
    processor: str

    def admits(self, info: WorkerInfo) -> bool:
        return info.model == self.model and info.processor == self.processor


class WorkerDirectory:
    """The live workers as the router (or a prefill worker, for encode workers) sees them, refreshed
    from Redis in the background; with `peering`, only workers that agree with it."""

    def __init__(self, client: aioredis.Redis, interval: float = 0.5, reset_grace: float = 5.0,
                 peering: Peering | None = None) -> None:
        self.client = client
        self.interval = interval
        self.reset_grace = reset_grace  # how long workers take to re-register after Redis lost its data
        self.peering = peering
        self._disagreeing: set[str] = set()  # addresses already warned about
        self.workers: dict[str, list[WorkerInfo]] = {stage: [] for stage in STAGES}
        self.redis_ok = False
        self._keep_until = 0.0  # until then, workers missing from Redis stay in the view
        self._task: asyncio.Task | None = None

    async def refresh(self) -> dict[str, list[WorkerInfo]]:
        """Re-read the live set. While Redis is unreachable the last view is kept (`redis_ok` is False);
        when it comes back empty (restarted, or flushed) the last view is kept for `reset_grace`
        seconds, while the workers re-register, instead of routing to nobody."""
        try:
            keys = [k async for k in self.client.scan_iter(match=KEY_PREFIX + "*", count=500)]
            values = await self.client.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            if self.redis_ok:
                log.warning("cannot read workers from Redis (%s); routing with the last view", exc)
            self.redis_ok = False
            return self.workers
        found = self._parse(keys, values)
        now = time.monotonic()
        lost_data = not any(found.values()) and any(self.workers.values())
        if lost_data or not self.redis_ok:
            self._keep_until = now + self.reset_grace
        if now < self._keep_until:
            for stage, infos in found.items():
                known = {info.address for info in infos}
                infos.extend(info for info in self.workers.get(stage, []) if info.address not in known)
        for stage in found:
            found[stage].sort(key=lambda info: info.address)
        self.redis_ok = True
        self.workers = found
        return found

    def _parse(self, keys: list, values: list) -> dict[str, list[WorkerInfo]]:
        found: dict[str, list[WorkerInfo]] = {stage: [] for stage in STAGES}
        for key, raw in zip(keys, values, strict=True):
            if not raw:
                continue
            try:
                info = WorkerInfo.from_json(raw)
            except ValueError as exc:
                log.warning("ignoring %s: %s", key, exc)
                continue
            if self.peering is not None and not self.peering.admits(info):
                if info.address not in self._disagreeing:
                    self._disagreeing.add(info.address)
                    log.warning("ignoring the %s worker %s: it serves %s with image processor %s, not %s with %s",
                                info.stage, info.address, info.model, info.processor or "(none published)",
                                self.peering.model, self.peering.processor)
                continue
            found[info.stage].append(info)
        return found

    def live(self, stage: str) -> list[WorkerInfo]:
        return self.workers.get(stage, [])

    def block_size(self) -> int | None:
        """The KV block size the live prefill workers publish, which prompt block hashes must use (the
        most common one while a rolling update mixes two); None while none publishes one."""
        sizes = Counter(info.block_size for info in self.live("prefill") if info.block_size > 0)
        return sizes.most_common(1)[0][0] if sizes else None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(periodically(self.interval, self.refresh, "refreshing the worker directory"))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
