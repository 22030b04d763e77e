"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seeded
generator whose state travels from prefill to decode."""

from __future__ import annotations

import os

import torch

from ..messages import SamplingParams


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from the request (or from the OS when unseeded)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def generator_state(generator: torch.Generator) -> bytes:
    return generator.get_state().numpy().tobytes()


def restore_generator(state: bytes) -> torch.Generator:
    generator = torch.Generator()
    if state:
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8).clone())
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a [vocab] row of float32 logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
