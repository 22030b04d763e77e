"""Greedy output of the full Hugging Face model: the bar E->P->D must meet."""

from __future__ import annotations

import torch

from epd.image_size import ImageSize
from epd.workers.models import ModelAdapter, decode_image


def reference_generate(adapter: ModelAdapter, model, input_ids: list[int], images: list[bytes],
                       max_new_tokens: int) -> list[int]:
    """`model.generate` (greedy) on the same prompt ids and images."""
    ids = torch.tensor([input_ids])
    kwargs: dict = {}
    if images:
        pil = [decode_image(data) for data in images]
        processed = adapter.image_processor(images=pil, return_tensors="pt")
        kwargs["pixel_values"] = processed["pixel_values"]
        if "image_grid_thw" in processed:
            kwargs["image_grid_thw"] = processed["image_grid_thw"]
            kwargs["mm_token_type_ids"] = (ids == adapter.image_token_id).int()
        if "image_sizes" in processed:
            kwargs["image_sizes"] = processed["image_sizes"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(input_ids):].tolist()


def image_size(data: bytes) -> ImageSize:
    image = decode_image(data)
    return ImageSize(image.width, image.height)
