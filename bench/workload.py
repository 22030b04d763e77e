"""Synthetic multimodal workloads: arrival times and request bodies."""

from __future__ import annotations

import random
from dataclasses import dataclass

from epd.image_size import ImageSize
from epd.synthetic_images import noise_png_data_url

WORDS = ("describe the image in detail and explain what each object is doing while you count the colors "
         "shapes people animals and signs that appear in every part of the picture").split()


@dataclass(frozen=True)
class WorkloadSpec:
    model: str
    requests: int = 100
    duration: float = 0.0  # seconds; when > 0 it bounds the run instead of `requests`
    rate: float = 0.0  # requests/s; 0 = all at once (closed loop bounded by concurrency)
    fixed_rate: bool = False  # evenly spaced arrivals instead of Poisson
    images_per_request: int = 1
    image_size: ImageSize = ImageSize(336, 336)
    prompt_tokens: int = 32
    max_tokens: int = 32
    repeat_images: bool = False  # every request sends the same images (multimodal cache hits)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests <= 0 and self.duration <= 0:
            raise ValueError("give a positive request count or duration")
        if self.rate < 0 or self.images_per_request < 0 or self.prompt_tokens <= 0 or self.max_tokens <= 0:
            raise ValueError("rate, images per request, prompt and output tokens must be positive")
        if min(self.image_size.width, self.image_size.height) <= 0:
            raise ValueError(f"image size must be positive, got {self.image_size}")


def arrival_times(spec: WorkloadSpec, count: int) -> list[float]:
    """Offsets in seconds from the start; Poisson (exponential gaps) or fixed rate."""
    if spec.rate == 0:
        return [0.0] * count
    rng = random.Random(spec.seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += 1 / spec.rate if spec.fixed_rate else rng.expovariate(spec.rate)
    return times


class RequestFactory:
    """Builds chat bodies; images are generated once per distinct seed and reused."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self._images: dict[int, str] = {}

    def body(self, index: int) -> dict:
        spec = self.spec
        rng = random.Random(spec.seed * 1_000_003 + index)
        text = " ".join(rng.choice(WORDS) for _ in range(spec.prompt_tokens))
        content: list[dict] = []
        for k in range(spec.images_per_request):
            seed = k if spec.repeat_images else index * spec.images_per_request + k + 1_000 * spec.seed
            if seed not in self._images:
                self._images[seed] = noise_png_data_url(spec.image_size.width, spec.image_size.height, seed)
            content.append({"type": "image_url", "image_url": {"url": self._images[seed]}})
        content.append({"type": "text", "text": text})
        return {"model": spec.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": spec.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
