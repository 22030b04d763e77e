"""The encode stage batches items from many requests; a bad image fails alone."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from epd.image_size import ImageSize
from epd.workers.models import EncodeInput, InvalidImageError, llava, load_adapter
from epd.workers.stages.encode import prepare_isolating_bad, split_by_image

from ..helpers import png_bytes


def items_of(stages, width: int, height: int, seed: int) -> list[EncodeInput]:
    data = png_bytes(width, height, seed)
    return [EncodeInput(data, tile) for tile in range(len(stages.adapter.image_items(ImageSize(width, height))))]


def test_a_batch_equals_its_items_encoded_alone(stages):
    items = items_of(stages, 40, 30, 1) + items_of(stages, 64, 48, 2) + items_of(stages, 50, 50, 3)
    batched = stages.vision.encode(items)
    for item, together in zip(items, batched, strict=True):
        alone = stages.vision.encode([item])[0]
        assert together.shape == alone.shape
        assert torch.allclose(together, alone, atol=1e-5)


def test_a_bad_image_fails_alone_in_its_batch(stages):
    good = items_of(stages, 40, 30, 1)[:1]
    bad = [EncodeInput(b"\x89PNG\r\n\x1a\nnot really a png")]
    prepared = prepare_isolating_bad(stages.vision, good + bad + good)
    assert isinstance(prepared[1], InvalidImageError) and "cannot decode image" in str(prepared[1])
    results = stages.vision.encode_prepared([prepared[0], prepared[2]])
    assert torch.equal(results[0], results[1]) and results[0].shape[0] == stages.adapter.image_items(
        ImageSize(40, 30))[0]


def test_the_items_of_one_image_are_preprocessed_once(monkeypatch):
    """LLaVA-NeXT's processor makes every tile of an image at once: the image's other items reuse them, and
    each item is what processing it alone gives."""
    adapter = load_adapter("tiny-llava-next")
    stages = SimpleNamespace(adapter=adapter, vision=adapter.load_vision())
    processor, runs = adapter.image_processor, []

    def counted(*args, **kwargs):
        runs.append(1)
        return processor(*args, **kwargs)
    first, second = items_of(stages, 64, 48, 5), items_of(stages, 50, 80, 6)
    alone = []
    for item in first + second:
        llava._recent_tiles.last = None
        alone.append(stages.vision.prepare(item))
    monkeypatch.setattr(adapter, "image_processor", counted)
    together = prepare_isolating_bad(stages.vision, first + second)
    assert len(first) > 1 and len(runs) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_a_batch_is_preprocessed_in_shares_that_keep_each_image_whole():
    """The encode worker preprocesses a batch on one helper thread per core: the shares keep the batch's order
    and never cut between two items of one image (their family may make them all at once)."""
    images = [bytes([n]) * 8 for n in range(5)]
    items = [EncodeInput(images[n], tile) for n, tiles in enumerate((2, 1, 3, 1, 1)) for tile in range(tiles)]
    shares = split_by_image(items, 2)
    assert [item for share in shares for item in share] == items
    assert [[(item.image_bytes[0], item.tile_index) for item in share] for share in shares] == [
        [(0, 0), (0, 1), (1, 0)], [(2, 0), (2, 1), (2, 2), (3, 0), (4, 0)]]
    assert [len(share) for share in split_by_image(items[3:6] + items[:3], 2)] == [3, 3]
    assert split_by_image(items, 1) == split_by_image(items, 0) == [items]
    assert split_by_image(items[:1], 2) == [items[:1]]
    assert split_by_image([], 2) == []
