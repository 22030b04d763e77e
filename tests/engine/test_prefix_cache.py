"""Prefix KV cache: block identity (text and image content), the byte bound,
and token-exact prefill when some rows of a batch start from a cached prefix."""

from __future__ import annotations

import hashlib

import torch

from epd.workers.engine import PrefillEngine, PrefixKVCache
from epd.workers.engine.prefix_cache import images_within
from epd.workers.cache import block_hashes

from .conftest import Stages, png_bytes
from .reference import reference_generate
from .test_token_exact import MAX_NEW, make_job, run_epd

IMG = 99  # image placeholder id in the hashing tests


def test_blocks_are_named_by_text_and_image_content():
    ids = [1, 2, 3, 4] + [IMG] * 6 + [5, 6, 7, 8, 9, 10]  # 16 tokens: 4 blocks of 4
    base = block_hashes(ids, IMG, ["a", "b"], [3, 3], 4)
    assert len(base) == 4
    assert block_hashes(ids, IMG, ["a", "b"], [3, 3], 4) == base
    other_image = block_hashes(ids, IMG, ["a", "c"], [3, 3], 4)  # image b's rows start in block 1
    assert other_image[:1] == base[:1] and other_image[1] != base[1] and other_image[2:] != base[2:]
    other_text = block_hashes(ids[:12] + [0, 0, 0, 0], IMG, ["a", "b"], [3, 3], 4)
    assert other_text[:3] == base[:3] and other_text[3] != base[3]
    assert block_hashes(ids, IMG, [], [], 4) == base[:1]  # unnamed images end the chain at their first block
    assert block_hashes(ids[:7], IMG, ["a", "b"], [3, 3], 4) == base[:1]  # only full blocks


def test_lookup_leaves_a_token_to_compute_and_capacity_bounds_the_bytes():
    layers = [(torch.randn(2, 12, 4), torch.randn(2, 12, 4)) for _ in range(3)]
    block_bytes = 3 * 2 * 2 * 4 * 4 * 4  # [layers, 2, heads, block, dim] float32
    cache = PrefixKVCache(capacity_bytes=2 * block_bytes, block_size=4)
    cache.store(["x", "y", "z"], layers)
    assert cache.blocks.bytes == 2 * block_bytes and "x" not in cache.blocks  # oldest block evicted
    assert cache.lookup(["x", "y", "z"], 12) is None  # the chain starts at the evicted block
    cache = PrefixKVCache(capacity_bytes=10 * block_bytes, block_size=4)
    cache.store(["x", "y", "z"], layers)
    hit = cache.lookup(["x", "y", "z"], 12)
    assert hit.tokens == 8  # 12 prompt tokens: the last block is recomputed for the first token's logits
    assert all(torch.equal(k, ref_k[:, :8]) and torch.equal(v, ref_v[:, :8])
               for (k, v), (ref_k, ref_v) in zip(hit.layers(), layers))


def test_images_wholly_inside_the_cached_prefix_need_no_embedding():
    ids = [1, IMG, IMG, 2, IMG, IMG, IMG, 3, 4]  # image 0 at 1-2, image 1 at 4-6
    assert images_within(ids, IMG, [2, 3], 4) == [True, False]
    assert images_within(ids, IMG, [2, 3], 7) == [True, True]
    assert images_within(ids, IMG, [2, 3], 2) == [False, False]


def with_keys(job, images: list[bytes]):
    job.image_keys = [hashlib.sha256(data).hexdigest() for data in images]
    return job


def test_prefix_hits_are_token_exact_in_a_mixed_batch(stages: Stages):
    images = [png_bytes(40 + 9 * k, 32 + 5 * k, seed=700 + k) for k in range(2)]
    cache = PrefixKVCache(capacity_bytes=1 << 28, block_size=4)
    engine = PrefillEngine(stages.language, stages.adapter, cache)
    first = with_keys(make_job(stages, "first", "Describe both images.", images), images)
    assert engine.run([first])[0].cached_tokens == 0

    follow_up = with_keys(make_job(stages, "follow", "Which one is brighter, and why?", images), images)
    same = with_keys(make_job(stages, "same", "Describe both images.", images), images)
    other = [png_bytes(44, 30, seed=777)]
    fresh = with_keys(make_job(stages, "fresh", "Describe both images.", other), other)
    handoffs = {h.request_id: h for h in engine.run([follow_up, same, fresh])}
    assert 0 < handoffs["follow"].cached_tokens < len(follow_up.input_ids)
    assert handoffs["same"].cached_tokens == (len(same.input_ids) - 1) // 4 * 4
    # another image: only the chat template before it is shared
    assert handoffs["fresh"].cached_tokens <= fresh.input_ids.index(stages.adapter.image_token_id)
    assert all(k.shape[1] == h.prompt_tokens for h in handoffs.values() for k, _ in h.layers)

    jobs = [(follow_up, images), (same, images), (fresh, other)]
    expected = {job.request_id: reference_generate(stages.adapter, stages.full, job.input_ids, imgs, MAX_NEW)
                for job, imgs in jobs}
    # As the server admits it: the prefix found first, and no embedding for an image inside it.
    same.prefix = engine.find_prefix(same)
    needed = engine.needed_images(same, same.prefix)
    assert needed == [False, False]
    same.image_embeddings = [None, None]
    assert run_epd(stages, [job for job, _ in jobs], prefill=engine) == expected  # now every row has a hit
