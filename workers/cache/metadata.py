"""Redis-held metadata of cached embeddings.

Per item key: {owner, n_tokens, hidden, dtype, bytes, state pending|ready,
created} with a TTL. Redis being down never fails a request: every call
degrades to "unknown" and is counted by the caller."""

from __future__ import annotations

import builtins
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..registry import WorkerDirectory

KEY_PREFIX = "epd:mm:"
State = Literal["pending", "ready"]


@dataclass(frozen=True)
class CacheRecord:
    owner: str
    n_tokens: int
    hidden: int
    dtype: str
    bytes: int
    state: State
    created: float

    @classmethod
    def from_hash(cls, data: Mapping[builtins.bytes | str, builtins.bytes | str]) -> CacheRecord | None:
        """The record, or None if the hash is not a well-formed one (Redis content is not trusted)."""
        try:
            d = {_text(k): _text(v) for k, v in data.items()}
            record = cls(owner=d["owner"], n_tokens=int(d["n_tokens"]), hidden=int(d["hidden"]), dtype=d["dtype"],
                         bytes=int(d["bytes"]), state=cast(State, d["state"]), created=float(d["created"]))
        except (KeyError, ValueError, UnicodeDecodeError):
            return None
        if record.state not in ("pending", "ready") or min(record.n_tokens, record.hidden, record.bytes) < 0:
            return None
        return record

    def fetchable_from(self, directory: WorkerDirectory) -> bool:
        """Whether this record may direct a fetch: ready, and owned by an encode worker that discovery
        lists right now (a record anyone wrote must not send a worker to an arbitrary address)."""
        return self.state == "ready" and any(w.address == self.owner for w in directory.live("encode"))


class MetadataStore:
    """Async access to the records; each method returns None/False when Redis is unreachable."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int = 3600) -> None:
        self.client = client
        self.ttl = ttl_seconds

    async def mark_pending(self, key: str, owner: str) -> bool:
        record = CacheRecord(owner, 0, 0, "", 0, "pending", time.time())
        return await self._write(key, record, ttl=60)

    async def mark_ready(self, key: str, owner: str, n_tokens: int, hidden: int, dtype: str, nbytes: int) -> bool:
        return await self._write(key, CacheRecord(owner, n_tokens, hidden, dtype, nbytes, "ready", time.time()))

    async def get(self, key: str) -> CacheRecord | None:
        try:
            data = await self.client.hgetall(KEY_PREFIX + key)
        except (RedisError, OSError):
            return None
        return CacheRecord.from_hash(data) if data else None

    async def get_many(self, keys: list[str]) -> dict[str, CacheRecord]:
        if not keys:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(KEY_PREFIX + key)
                results = await pipe.execute()
        except (RedisError, OSError):
            return {}
        records = {key: CacheRecord.from_hash(data) for key, data in zip(keys, results, strict=True) if data}
        return {key: record for key, record in records.items() if record is not None}

    async def forget(self, key: str, owner: str | None = None) -> bool:
        """Delete the record (only if still owned by `owner`, when given)."""
        try:
            if owner is not None:
                current = await self.client.hget(KEY_PREFIX + key, "owner")
                if current is not None and current != owner.encode():
                    return False
            await self.client.delete(KEY_PREFIX + key)
            return True
        except (RedisError, OSError):
            return False

    async def pending_keys(self) -> list[str]:
        """Keys whose record is still pending (tests use it to check nothing is left half-done)."""
        found = []
        try:
            async for raw in self.client.scan_iter(match=KEY_PREFIX + "*"):
                if (await self.client.hget(raw, "state")) == b"pending":
                    found.append(raw.decode()[len(KEY_PREFIX):])
        except (RedisError, OSError):
            return []
        return found

    async def _write(self, key: str, record: CacheRecord, ttl: int | None = None) -> bool:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(KEY_PREFIX + key)
                pipe.hset(KEY_PREFIX + key, mapping={k: str(v) for k, v in asdict(record).items()})
                pipe.expire(KEY_PREFIX + key, ttl or self.ttl)
                await pipe.execute()
            return True
        except (RedisError, OSError):
            return False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
