"""Discovery and cache metadata read from a real redis-server are not trusted blindly:
malformed records are skipped, a cache record directs a fetch only to an encode worker
discovery lists, and the router's view survives Redis going away or losing its data."""

from __future__ import annotations

import pytest

from epd.stages import STAGES
from epd.workers.cache import CacheRecord, MetadataStore
from epd.workers.redis_connection import REDIS_URL_ENV, connect, redacted, redis_url
from epd.workers.registry import (
    KEY_PREFIX,
    Peering,
    WorkerDirectory,
    WorkerInfo,
    WorkerLoad,
    WorkerRegistration,
)

from ..conftest import start_redis


@pytest.fixture
def redis_server():
    server = start_redis()
    yield server
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait(10)


def info(stage: str, address: str) -> WorkerInfo:
    return WorkerInfo(stage, address, "tiny-llava", 8)


async def register(client, *infos: WorkerInfo) -> WorkerRegistration:
    registration = WorkerRegistration(client, list(infos), WorkerLoad)
    await registration.beat()
    return registration


async def test_malformed_worker_records_are_skipped(redis_server):
    client = connect(redis_server.url)
    await register(client, info("encode", "10.0.0.1:50051"))
    for key, raw in {"encode:x": "{not json", "decode:y": '{"stage": "decode"}', "prefill:z": "[]",
                     "encode:w": '{"stage": "sidecar", "address": "a:1", "model": "m", "batch_limit": 1}',
                     "decode:v": '{"stage": "decode", "address": "no-port", "model": "m", "batch_limit": 1}'}.items():
        await client.set(KEY_PREFIX + key, raw)
    directory = WorkerDirectory(client)
    workers = await directory.refresh()
    assert [w.address for w in workers["encode"]] == ["10.0.0.1:50051"]
    assert workers["prefill"] == workers["decode"] == []
    await client.aclose()


async def test_only_workers_of_the_same_model_and_image_processor_are_peers(redis_server):
    client = connect(redis_server.url)
    await register(client, WorkerInfo("encode", "10.0.0.1:1", "tiny-llava", 8, processor="p1"),
                   WorkerInfo("encode", "10.0.0.2:1", "tiny-llava", 8, processor="p2"),  # other image settings
                   WorkerInfo("encode", "10.0.0.3:1", "tiny-qwen2-vl", 8, processor="p1"))  # another model
    # a newer worker's record, with a field this version does not know, is still read
    await client.set(KEY_PREFIX + "encode:10.0.0.4:1", '{"stage": "encode", "address": "10.0.0.4:1", "model": '
                     '"tiny-llava", "batch_limit": 8, "processor": "p1", "something_new": true}')
    directory = WorkerDirectory(client, peering=Peering("tiny-llava", "p1"))
    workers = await directory.refresh()
    assert [w.address for w in workers["encode"]] == ["10.0.0.1:1", "10.0.0.4:1"]
    assert len((await WorkerDirectory(client).refresh())["encode"]) == 4  # no peering: everyone
    await client.aclose()


async def test_the_block_size_is_the_one_prefill_workers_publish(redis_server):
    client = connect(redis_server.url)
    directory = WorkerDirectory(client)
    await register(client, WorkerInfo("decode", "10.0.0.9:1", "m", 8, block_size=32))
    await directory.refresh()
    assert directory.block_size() is None  # no prefill worker yet: prompts are not hashed
    await register(client, *(WorkerInfo("prefill", f"10.0.0.{i}:1", "m", 8192, block_size=size)
                             for i, size in enumerate((16, 16, 32))))
    await directory.refresh()
    assert directory.block_size() == 16  # a rolling update mixing two: the most common
    await client.aclose()


async def test_a_cache_record_directs_a_fetch_only_to_a_discovered_encode_worker(redis_server):
    client = connect(redis_server.url)
    await register(client, info("encode", "10.0.0.1:50051"), info("decode", "10.0.0.9:50053"))
    directory = WorkerDirectory(client)
    await directory.refresh()
    store = MetadataStore(client)
    await store.mark_ready("k-good", "10.0.0.1:50051", 16, 64, "float32", 4096)
    await store.mark_ready("k-rogue", "203.0.113.5:50051", 16, 64, "float32", 4096)  # nobody we know
    await store.mark_ready("k-decode", "10.0.0.9:50053", 16, 64, "float32", 4096)  # not an encode worker
    await store.mark_pending("k-pending", "10.0.0.1:50051")
    await client.hset("epd:mm:k-garbled", mapping={"owner": "10.0.0.1:50051", "n_tokens": "lots"})
    records = await store.get_many(["k-good", "k-rogue", "k-decode", "k-pending", "k-garbled"])
    assert sorted(records) == ["k-decode", "k-good", "k-pending", "k-rogue"]  # the garbled one is no record
    assert {key: r.fetchable_from(directory) for key, r in records.items()} == {
        "k-good": True, "k-rogue": False, "k-decode": False, "k-pending": False}
    assert CacheRecord.from_hash({b"owner": b"a:1", b"n_tokens": b"-4", b"hidden": b"1", b"dtype": b"x",
                                  b"bytes": b"1", b"state": b"ready", b"created": b"0"}) is None
    await client.aclose()


async def test_the_view_survives_redis_going_away_and_losing_its_data(redis_server):
    client = connect(redis_server.url)
    await register(client, info("encode", "e:1"), info("prefill", "p:1"), info("decode", "d:1"))
    directory = WorkerDirectory(client, reset_grace=60)
    await directory.refresh()
    # Redis loses its data (a restart without persistence, a flush): the last view is kept while
    # the workers re-register, instead of routing to nobody.
    await client.flushall()
    view = await directory.refresh()
    assert directory.redis_ok and [w.address for s in STAGES for w in view[s]] == \
        ["e:1", "p:1", "d:1"]
    await register(client, info("decode", "d:2"))
    assert [w.address for w in (await directory.refresh())["decode"]] == ["d:1", "d:2"]
    # Redis gone: still the last view, flagged.
    redis_server.process.kill()
    redis_server.process.wait(10)
    view = await directory.refresh()
    assert not directory.redis_ok and [w.address for w in view["decode"]] == ["d:1", "d:2"]
    await client.aclose()


def test_the_redis_url_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    with pytest.raises(ValueError, match=f"give --redis-url or set {REDIS_URL_ENV}"):
        redis_url("")
    monkeypatch.setenv(REDIS_URL_ENV, "rediss://:pw@redis.example:6380/0")
    assert redis_url("") == "rediss://:pw@redis.example:6380/0"
    assert redis_url("redis://other:6379/1") == "redis://other:6379/1"
    with pytest.raises(ValueError, match=r"http://user:\*\*\*@h:1/0. must start with redis://"):
        redis_url("http://user:secret@h:1/0")
    assert redacted("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redacted("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
