"""Multimodal cache parts against a real redis-server: content keys, the byte-bounded
LRU, metadata records (states, TTL, ownership) and degrading when Redis is down."""

from __future__ import annotations

import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from epd.workers.cache import ByteLRU, MetadataStore, image_key, item_key
from epd.workers.cache.metadata import KEY_PREFIX
from epd.workers.launcher.processes import free_port

from ..conftest import RedisServer


def test_image_key_depends_on_model_processor_and_bytes_only() -> None:
    key = image_key("tiny-llava", "clip-336", b"png")
    assert key == image_key("tiny-llava", "clip-336", b"png")
    assert len({key, image_key("tiny-qwen", "clip-336", b"png"), image_key("tiny-llava", "clip-224", b"png"),
                image_key("tiny-llava", "clip-336", b"png2")}) == 4
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert image_key("ab", "c", b"") != image_key("a", "bc", b"")


def test_item_key_names_tiles() -> None:
    assert item_key("abc", -1) == "abc"
    assert item_key("abc", 0) == "abc.t0"
    assert item_key("abc", 3) == "abc.t3"


def _tensor(n_floats: int) -> torch.Tensor:
    return torch.zeros(n_floats, dtype=torch.float32)  # 4 bytes per element


def test_lru_evicts_least_recent_by_bytes() -> None:
    lru = ByteLRU(capacity=40)
    assert lru.put("a", _tensor(4)) == []
    assert lru.put("b", _tensor(4)) == []
    assert lru.get("a") is not None  # "b" is now the least recent
    assert lru.put("c", _tensor(4)) == ["b"]
    assert ("a" in lru, "b" in lru, "c" in lru) == (True, False, True)
    assert lru.bytes == 32
    assert lru.put("a", _tensor(2)) == []  # refreshing a key replaces its bytes
    assert lru.bytes == 24


def test_lru_does_not_keep_a_tensor_larger_than_itself() -> None:
    lru = ByteLRU(capacity=8)
    assert lru.put("small", _tensor(1)) == []
    assert lru.put("huge", _tensor(10)) == ["small", "huge"]
    assert (len(lru), lru.bytes) == (0, 0)


async def test_records_go_pending_then_ready_with_ttl(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    store = MetadataStore(client, ttl_seconds=120)
    try:
        await client.flushall()
        assert await store.mark_pending("k1", "127.0.0.1:5001")
        pending = await store.get("k1")
        assert pending is not None and (pending.state, pending.owner, pending.n_tokens) == ("pending", "127.0.0.1:5001", 0)
        assert await store.pending_keys() == ["k1"]
        assert 0 < await client.ttl(KEY_PREFIX + "k1") <= 60  # a crashed owner's pending record expires soon

        assert await store.mark_ready("k1", "127.0.0.1:5001", n_tokens=576, hidden=64, dtype="float32", nbytes=147456)
        ready = await store.get("k1")
        assert ready is not None
        assert (ready.state, ready.n_tokens, ready.hidden, ready.dtype, ready.bytes) == ("ready", 576, 64, "float32",
                                                                                      147456)
        assert 60 < await client.ttl(KEY_PREFIX + "k1") <= 120
        assert await store.pending_keys() == []
        assert set(await store.get_many(["k1", "missing"])) == {"k1"}
    finally:
        await client.flushall()
        await client.aclose()


async def test_forget_only_removes_own_records(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    store = MetadataStore(client)
    try:
        await client.flushall()
        await store.mark_pending("k2", "owner-a")
        assert not await store.forget("k2", owner="owner-b")  # someone else's record stays
        assert await store.get("k2") is not None
        assert await store.forget("k2", owner="owner-a")
        assert await store.get("k2") is None
    finally:
        await client.flushall()
        await client.aclose()


async def test_unreachable_redis_degrades_to_unknown() -> None:
    # Nothing listens on this port: every call answers "unknown" instead of raising
    # (no retries, so the test does not wait out redis-py's backoff).
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    store = MetadataStore(client)
    try:
        assert not await store.mark_pending("k", "owner")
        assert not await store.mark_ready("k", "owner", 1, 1, "float32", 4)
        assert await store.get("k") is None
        assert await store.get_many(["k"]) == {}
        assert not await store.forget("k")
        assert await store.pending_keys() == []
    finally:
        await client.aclose()
