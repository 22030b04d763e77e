"""What memory allows, worked out from the model without simulating: the
largest encode batch and the most images per request each mode can take, and
the context window's own cap. Bundled and co-located GPUs are assumed to be
configured for exactly the load asked about (their activation reserve sized
for those images), which is the most generous reading for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from epd.image_size import ImageSize

from .perfmodel import PerformanceModel
from .serving import ServingConfig, instance_memory

SEARCH_CAP = 1 << 20


def largest(fits: Callable[[int], bool]) -> int:
    """The largest n >= 0 with fits(n), for a predicate that holds up to some n and fails after it."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high < SEARCH_CAP and fits(high):
        low, high = high, high * 2
    if high >= SEARCH_CAP and fits(SEARCH_CAP):
        return SEARCH_CAP
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass(frozen=True)
class MemoryLimits:
    encode_batch: int  # images of this size in one vision forward
    images_per_request: int  # as far as memory goes
    images_per_request_by_context: int  # as far as the language model's context window goes

    def as_dict(self) -> dict[str, Any]:
        return {"largest_encode_batch": self.encode_batch, "images_per_request_memory": self.images_per_request,
                "images_per_request_context": self.images_per_request_by_context}


def memory_limits(model: PerformanceModel, config: ServingConfig, image: ImageSize, text_tokens: int,
                  output_tokens: int) -> MemoryLimits:
    arch, memory = model.architecture, model.memory
    patch = arch.vision_patch_tokens(image.width, image.height)
    squares = arch.tile_token_squares(image.width, image.height)
    per_image = arch.image_tokens(image.width, image.height)
    pools = instance_memory(model, config)

    def vision(n: int) -> float:
        return memory.encode_activation(n * patch, n * squares)

    def prompt(n: int) -> int:
        return text_tokens + n * per_image

    by_context = largest(lambda n: prompt(n) + output_tokens <= arch.max_context)
    if config.mode == "epd":
        encode = pools["encode"].activation
        batch = largest(lambda n: vision(n) <= encode)
        images = largest(lambda n: batch >= 1 and prompt(n) <= pools["prefill"].kv_tokens
                         and prompt(n) + output_tokens <= pools["decode"].kv_tokens)
        return MemoryLimits(batch, images, by_context)
    holder = pools["colocated" if config.mode == "colocated" else "prefill"]
    fixed = holder.usable - holder.weights - holder.reserve
    others = [memory.prefill_activation(config.prefill_budget)]
    if config.mode == "colocated":
        others.append(memory.decode_activation(config.decode_batch))
    floor = max(others)
    kv = memory.kv_per_token
    decode_room = pools["decode"].kv_tokens if config.mode == "bundled" else SEARCH_CAP

    def holds(n: int, tokens: int) -> bool:
        """n images in one forward next to the KV of `tokens` tokens, with the reserve sized for them."""
        return fixed - max(vision(n), floor) >= tokens * kv

    batch = largest(lambda n: holds(n, n * per_image))
    extra = output_tokens if config.mode == "colocated" else 0
    images = largest(lambda n: holds(n, prompt(n) + extra) and prompt(n) + output_tokens <= decode_room)
    return MemoryLimits(batch, images, by_context)
