"""What an image will cost an encode worker, known from its header alone.

Bytes say little: an 87-byte 60000x1 PNG is scaled by a shortest-edge resize
to hundreds of megabytes before the vision tower sees it. So an image is
judged by its decoded pixels, its aspect ratio, the pixels the model's
processor will produce from it, and the image tokens it becomes."""

from __future__ import annotations

from dataclasses import dataclass

from epd.image_size import ImageSize

from ..models import ModelAdapter
from .errors import bad_request


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096  # decoded width x height
    fetch_timeout: float = 10.0
    max_aspect_ratio: float = 20.0  # long side / short side
    max_processed_pixels: int = 4096 * 4096  # what the processor's resize makes of it
    max_image_tokens: int = 0  # 0: the model's context length

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.fetch_timeout, self.max_processed_pixels) <= 0:
            raise ValueError("image limits must be positive")
        if self.max_aspect_ratio < 1 or self.max_image_tokens < 0:
            raise ValueError("max_aspect_ratio must be >= 1 and max_image_tokens >= 0")


def processed_pixels(adapter: ModelAdapter, size: ImageSize) -> int:
    """Pixels the model's image processor produces from an image of this size (before cropping)."""
    grid = getattr(adapter, "grid", None)
    if grid is not None:  # dynamic resolution (Qwen2-VL): the processor resizes to its patch grid
        _, rows, cols = grid(size)
        patch = adapter.image_processor.patch_size
        return rows * cols * patch * patch
    target = adapter.image_processor.size
    edge, height, width = (_setting(target, name) for name in ("shortest_edge", "height", "width"))
    if edge:  # CLIP-style: the short side is scaled to the edge and the long side follows
        scale = edge / min(size.width, size.height)
        return round(size.width * scale) * round(size.height * scale)
    if height and width:
        return int(height) * int(width)
    return size.width * size.height


def _setting(target, name: str):
    """A processor size setting (a dict, or transformers' SizeDict whose unset keys are None)."""
    if target is None:
        return None
    return target.get(name) if isinstance(target, dict) else getattr(target, name, None)


class ImageCostCheck:
    """Refuses (400 image_too_large, naming the limit) an image that would cost too much to encode."""

    def __init__(self, adapter: ModelAdapter, limits: ImageLimits) -> None:
        self.adapter = adapter
        self.limits = limits
        self.max_tokens = limits.max_image_tokens or adapter.max_context

    def check(self, size: ImageSize, param: str) -> None:
        limits, width, height = self.limits, size.width, size.height
        if width <= 0 or height <= 0:
            raise bad_request(f"image of {width}x{height} pixels has no area", "invalid_image", param)
        if width * height > limits.max_pixels:
            self._refuse(f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels", param)
        ratio = max(width, height) / min(width, height)
        if ratio > limits.max_aspect_ratio:
            self._refuse(f"image of {width}x{height} pixels has an aspect ratio of {ratio:.1f}, over the limit of "
                         f"{limits.max_aspect_ratio:g}", param)
        try:
            processed, tokens = processed_pixels(self.adapter, size), self.adapter.image_tokens(size)
        except ValueError as exc:  # the processor's own refusal (e.g. Qwen2-VL's aspect ratio)
            raise bad_request(f"image of {width}x{height} pixels: {exc}", "image_too_large", param) from exc
        if processed > limits.max_processed_pixels:
            self._refuse(f"image of {width}x{height} pixels becomes {processed} pixels in the model's processor, "
                         f"over the limit of {limits.max_processed_pixels}", param)
        if tokens > self.max_tokens:
            self._refuse(f"image of {width}x{height} pixels becomes {tokens} image tokens, over the limit of "
                         f"{self.max_tokens}", param)

    @staticmethod
    def _refuse(message: str, param: str) -> None:
        raise bad_request(message, "image_too_large", param)
