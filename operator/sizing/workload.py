"""Simulated workloads: Poisson, bursty, or a replayed JSON-lines trace."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from epd.image_size import ImageSize

from .architectures import Architecture

if TYPE_CHECKING:
    from .serving import Instance


@dataclass
class SimRequest:
    id: int
    arrival: float
    images: list[ImageSize]
    text_tokens: int
    output_tokens: int
    # filled by the simulator
    first_token: float = -1.0
    finish: float = -1.0
    pending_items: int = 0
    prompt_tokens: int = 0
    rejected: str = ""  # why the request can never be served where it was sent ("" when it can)
    encoded: float = -1.0  # when its last image was encoded (EPD)
    prefill_start: float = -1.0
    decode_start: float = -1.0
    generated: int = 0  # output tokens so far (the first comes from prefill)
    context: int = 0  # tokens of this request in a KV pool now
    kv_holder: Instance | None = None  # the instance whose KV pool holds them
    preemptions: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival


@dataclass(frozen=True)
class WorkloadMix:
    images_per_request: int = 4
    image_size: ImageSize = ImageSize(1024, 1024)
    text_tokens: int = 64
    output_tokens: int = 64


def poisson(rate: float, count: int, mix: WorkloadMix, seed: int = 0) -> list[SimRequest]:
    if rate <= 0 or count <= 0:
        raise ValueError("rate and count must be positive")
    rng = random.Random(seed)
    now = 0.0
    requests: list[SimRequest] = []
    for i in range(count):
        now += rng.expovariate(rate)
        requests.append(_request(i, now, mix))
    return requests


def bursty(base_rate: float, burst_rate: float, period: float, burst_fraction: float, duration: float,
           mix: WorkloadMix, seed: int = 0) -> list[SimRequest]:
    """Poisson arrivals whose rate switches between base and burst: each period ends with a burst
    lasting `burst_fraction` of it (so a run starts quiet, as a service does)."""
    rng = random.Random(seed)
    now = 0.0
    requests: list[SimRequest] = []
    while now < duration:
        in_burst = (now % period) >= (1 - burst_fraction) * period
        now += rng.expovariate(burst_rate if in_burst else base_rate)
        if now < duration:
            requests.append(_request(len(requests), now, mix))
    return requests


def _request(index: int, arrival: float, mix: WorkloadMix) -> SimRequest:
    return SimRequest(index, arrival, [mix.image_size] * mix.images_per_request, mix.text_tokens,
                      mix.output_tokens)


def load_trace(path: Path) -> list[SimRequest]:
    """JSON lines: {"arrival": s, "images": [[w, h], ...], "prompt_tokens": n, "output_tokens": n}."""
    requests: list[SimRequest] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            images = [ImageSize(int(w), int(h)) for w, h in row.get("images", [])]
            request = SimRequest(len(requests), float(row["arrival"]), images, int(row["prompt_tokens"]),
                                 int(row["output_tokens"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: malformed trace line ({type(exc).__name__}: {exc}); expected "
                             '{"arrival": s, "images": [[w, h]], "prompt_tokens": n, "output_tokens": n}') from exc
        if request.output_tokens <= 0 or request.arrival < 0:
            raise ValueError(f"{path}:{number}: arrival must be >= 0 and output_tokens > 0")
        requests.append(request)
    if not requests:
        raise ValueError(f"{path}: the trace is empty")
    return sorted(requests, key=lambda r: r.arrival)


def rescale(requests: list[SimRequest], factor: float) -> list[SimRequest]:
    """The same requests arriving `factor` times faster (fresh copies)."""
    return [SimRequest(r.id, r.arrival / factor, r.images, r.text_tokens, r.output_tokens) for r in requests]


def prompt_tokens(request: SimRequest, arch: Architecture) -> int:
    return request.text_tokens + sum(arch.image_tokens(i.width, i.height) for i in request.images)
