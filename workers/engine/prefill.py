"""Prefill: merge text and image embeddings, run one batched forward over
several prompts, sample each first token, and cut out each request's KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..messages import KVHandoff, PrefillJob
from ..models import LanguagePartBase, ModelAdapter
from .sampling import generator_state, new_generator, sample


class PrefillEngine:
    """Synchronous prefill over a language part; the server calls it from one thread."""

    def __init__(self, language: LanguagePartBase, adapter: ModelAdapter) -> None:
        self.language = language
        self.adapter = adapter

    def prompt_embeddings(self, job: PrefillJob) -> torch.Tensor:
        """[L, hidden] input embeddings with the image rows scattered at the placeholders."""
        ids = torch.tensor(job.input_ids, device=self.language.device)
        embeds = self.language.embed(ids)
        slots = (ids == self.adapter.image_token_id).nonzero().view(-1)
        images = [e.to(embeds.device, embeds.dtype) for e in job.image_embeddings]
        rows = torch.cat(images) if images else embeds.new_zeros((0, embeds.shape[-1]))
        if rows.shape[0] != slots.numel():
            raise ValueError(f"request {job.request_id}: {slots.numel()} image placeholders but "
                             f"{rows.shape[0]} embedding rows")
        embeds = embeds.clone()
        embeds[slots] = rows
        return embeds

    @torch.no_grad()
    def run(self, jobs: Sequence[PrefillJob]) -> list[KVHandoff]:
        """One forward over all jobs (left-padded); a KVHandoff per job, in order."""
        lengths = [len(job.input_ids) for job in jobs]
        width = max(lengths)
        embeds = [self.prompt_embeddings(job) for job in jobs]
        positions, deltas = zip(*(self.language.prompt_positions(job.input_ids, job.image_sizes) for job in jobs))
        hidden = embeds[0].shape[-1]
        batch = embeds[0].new_zeros((len(jobs), width, hidden))
        mask = torch.zeros((len(jobs), width), dtype=torch.long, device=batch.device)
        pos = torch.zeros((*positions[0].shape[:-1], len(jobs), width), dtype=torch.long)
        for row, (emb, p, length) in enumerate(zip(embeds, positions, lengths)):
            batch[row, width - length:] = emb
            mask[row, width - length:] = 1
            pos[..., row, width - length:] = p
        cache = DynamicCache(config=self.adapter.text_config)
        logits = self.language.forward(batch, mask, pos.to(batch.device), cache)
        handoffs = []
        for row, (job, length, delta) in enumerate(zip(jobs, lengths, deltas)):
            generator = new_generator(job.sampling.seed)
            first = sample(logits[row], job.sampling, generator)
            layers = [(layer.keys[row, :, width - length:].clone(), layer.values[row, :, width - length:].clone())
                      for layer in cache.layers]
            handoffs.append(KVHandoff(request_id=job.request_id, prompt_tokens=length, first_token=first,
                                      next_position=length, rope_delta=delta, sampling=job.sampling,
                                      generator_state=generator_state(generator), layers=layers))
        return handoffs
