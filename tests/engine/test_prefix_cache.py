"""The prefix cache is the prefill pool itself: full blocks named by content,
shared by reference, kept after their sequences finish and evicted least
recently used; hits are token-exact in a mixed batch."""

from __future__ import annotations

import hashlib

import pytest

from epd.workers.cache import block_hashes
from epd.workers.engine.block_allocator import BlockAllocator, OutOfBlocks
from epd.workers.engine.prefill import images_within

from .conftest import Stages, png_bytes
from .driver import MAX_NEW, Engines, make_job
from .reference import reference_generate

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


def test_named_blocks_are_shared_kept_when_free_and_evicted_least_recently_used():
    allocator = BlockAllocator(4, max_cached_blocks=2)
    first = allocator.allocate(3)
    for block, name in zip(first, "xyz", strict=True):
        allocator.name(block, name)
    assert allocator.share_prefix(["x", "y", "q"], limit=3) == first[:2]  # shared: refs 2, no copy
    allocator.free_blocks(first)
    assert allocator.used == 2  # x and y are still held by the second user
    allocator.free_blocks(first[:2])
    assert allocator.used == 0 and allocator.cached_names() == 2  # z was dropped: only 2 may idle cached
    assert allocator.share_prefix(["z"], limit=1) == []
    # 2 empty blocks + the least recently used cached one: y, the tail, went back before x
    fresh = allocator.allocate(3)
    assert allocator.share_prefix(["x", "y"], limit=2) == first[:1] and allocator.cached_names() == 1
    with pytest.raises(OutOfBlocks):
        allocator.allocate(1)
    allocator.free_blocks(fresh + first[:1])
    assert allocator.free == 4


def test_freed_blocks_come_back_in_their_old_order():
    allocator = BlockAllocator(8, max_cached_blocks=0)
    blocks = allocator.allocate(5)
    allocator.free_blocks(blocks)
    assert allocator.allocate(5) == blocks  # one run of consecutive ids stays one run (one copy per handoff)


def test_images_wholly_inside_the_cached_prefix_need_no_embedding():
    ids = [1, IMG, IMG, 2, IMG, IMG, IMG, 3, 4]  # image 0 at 1-2, image 1 at 4-6
    assert images_within(ids, IMG, [2, 3], 4) == [True, False]
    assert images_within(ids, IMG, [2, 3], 7) == [True, True]
    assert images_within(ids, IMG, [2, 3], 2) == [False, False]


def keys(images: list[bytes]) -> list[str]:
    return [hashlib.sha256(data).hexdigest() for data in images]


def test_prefix_hits_are_token_exact_in_a_mixed_batch(stages: Stages):
    images = [png_bytes(40 + 9 * k, 32 + 5 * k, seed=700 + k) for k in range(2)]
    engines = Engines.build(stages)
    first = make_job(stages, "first", "Describe both images.", images, keys=keys(images))
    assert engines.prefill_all([first])[0].cached_tokens == 0
    assert engines.prefill.allocator.used == 0 and engines.prefill.allocator.cached_names() > 0

    follow_up = make_job(stages, "follow", "Which one is brighter, and why?", images, keys=keys(images))
    same = make_job(stages, "same", "Describe both images.", images, keys=keys(images))
    other = [png_bytes(44, 30, seed=777)]
    fresh = make_job(stages, "fresh", "Describe both images.", other, keys=keys(other))
    # As the server admits it: the prefix found first (pinned), and no embedding for an image inside it.
    same.prefix = engines.prefill.find_prefix(same)
    assert engines.prefill.needed_images(same, same.prefix) == [False, False]
    same.image_embeddings = [None, None]
    jobs = [(follow_up, images), (same, images), (fresh, other)]
    expected = {job.request_id: reference_generate(stages.adapter, stages.full, job.input_ids, imgs, MAX_NEW)
                for job, imgs in jobs}
    named = [engines.prefill.allocator.by_name[name] for name in same.prefix_blocks[:len(same.prefix.blocks)]]
    assert same.prefix.blocks == named  # a hit is the very blocks the first prompt computed: nothing copied
    assert engines.run([job for job, _ in jobs]) == expected
    assert engines.prefill.allocator.used == 0


def test_cached_tokens_are_reported_and_count_only_full_blocks(stages: Stages):
    images = [png_bytes(40, 32, seed=800)]
    engines = Engines.build(stages)
    first = make_job(stages, "a", "Describe the image.", images, keys=keys(images))
    engines.prefill_all([first])
    again = make_job(stages, "b", "Describe the image.", images, keys=keys(images))
    follow = make_job(stages, "c", "And now in one word?", images, keys=keys(images))
    handoffs = {h.request_id: h for h in engines.prefill_all([again, follow])}
    assert handoffs["b"].cached_tokens == (len(again.input_ids) - 1) // 4 * 4  # all but the last token's block
    assert 0 < handoffs["c"].cached_tokens < len(follow.input_ids)
    assert all(len(h.block_table) == -(-h.prompt_tokens // 4) for h in handoffs.values())
