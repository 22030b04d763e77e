"""Prefill: merge text and image embeddings, run one batched forward over
several prompts (each starting after the prefix it finds in the prefix KV cache),
sample each first token, and cut out each request's KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..cache import block_hashes
from ..messages import KVHandoff, PrefillJob
from ..models import LanguagePartBase, ModelAdapter
from .prefix_cache import PrefixHit, PrefixKVCache, images_within
from .sampling import generator_state, new_generator, sample
from .tensors import left_pad


class PrefillEngine:
    """Synchronous prefill over a language part; the server calls it from one thread."""

    def __init__(self, language: LanguagePartBase, adapter: ModelAdapter,
                 prefix_cache: PrefixKVCache | None = None) -> None:
        self.language = language
        self.adapter = adapter
        self.prefix_cache = prefix_cache

    def prompt_embeddings(self, job: PrefillJob) -> torch.Tensor:
        """[L, hidden] input embeddings with the image rows scattered at the placeholders (zeros
        for an image left out because the job's cached prefix covers it)."""
        ids = torch.tensor(job.input_ids, device=self.language.device)
        embeds = self.language.embed(ids)
        slots = (ids == self.adapter.image_token_id).nonzero().view(-1)
        images = [e.to(embeds.device, embeds.dtype) if e is not None
                  else embeds.new_zeros((self.adapter.image_tokens(size), embeds.shape[-1]))
                  for e, size in zip(job.image_embeddings, job.image_sizes)]
        rows = torch.cat(images) if images else embeds.new_zeros((0, embeds.shape[-1]))
        if rows.shape[0] != slots.numel():
            raise ValueError(f"request {job.request_id}: {slots.numel()} image placeholders but "
                             f"{rows.shape[0]} embedding rows")
        embeds = embeds.clone()
        embeds[slots] = rows
        return embeds

    def _image_rows(self, job: PrefillJob) -> list[int]:
        return [self.adapter.image_tokens(size) for size in job.image_sizes]

    def block_hashes(self, job: PrefillJob) -> list[str]:
        """The job's prompt block hashes, computed once (at admission, or in `run`)."""
        if self.prefix_cache is None:
            return []
        if job.prefix_blocks is None:
            job.prefix_blocks = block_hashes(job.input_ids, self.adapter.image_token_id, job.image_keys,
                                             self._image_rows(job), self.prefix_cache.block_size)
        return job.prefix_blocks

    def find_prefix(self, job: PrefillJob) -> PrefixHit | None:
        """The job's longest cached prefix (none without a prefix cache)."""
        return self.prefix_cache.lookup(self.block_hashes(job), len(job.input_ids)) if self.prefix_cache else None

    def needed_images(self, job: PrefillJob, prefix: PrefixHit | None) -> list[bool]:
        """Which images' embeddings the forward needs: those not wholly inside the cached prefix."""
        if prefix is None:
            return [True] * len(job.image_sizes)
        within = images_within(job.input_ids, self.adapter.image_token_id, self._image_rows(job), prefix.tokens)
        return [not inside for inside in within]

    @torch.no_grad()
    def run(self, jobs: Sequence[PrefillJob]) -> list[KVHandoff]:
        """One forward over all jobs; a KVHandoff per job, in order.

        Row layout: [pad | cached prefix KV | pad | prompt suffix], both parts left-padded to the
        widest in the batch, so jobs with and without a prefix hit share the forward."""
        hashes = [self.block_hashes(job) for job in jobs]
        hits = [job.prefix or (self.prefix_cache.lookup(h, len(job.input_ids)) if self.prefix_cache else None)
                for job, h in zip(jobs, hashes)]
        cached = [hit.tokens if hit else 0 for hit in hits]
        lengths = [len(job.input_ids) for job in jobs]
        suffixes = [length - c for length, c in zip(lengths, cached)]
        past, width = max(cached), max(suffixes)
        embeds = [self.prompt_embeddings(job)[c:] for job, c in zip(jobs, cached)]
        positions, deltas = zip(*(self.language.prompt_positions(job.input_ids, job.image_sizes) for job in jobs))
        hidden = embeds[0].shape[-1]
        batch = embeds[0].new_zeros((len(jobs), width, hidden))
        mask = torch.zeros((len(jobs), past + width), dtype=torch.long, device=batch.device)
        pos = torch.zeros((*positions[0].shape[:-1], len(jobs), width), dtype=torch.long)
        for row, (emb, p, c, n) in enumerate(zip(embeds, positions, cached, suffixes)):
            batch[row, width - n:] = emb
            mask[row, past - c:past] = 1
            mask[row, past + width - n:] = 1
            pos[..., row, width - n:] = p[..., c:]
        cache = DynamicCache(config=self.adapter.text_config)
        if past:
            prefixes = [hit.layers() if hit else None for hit in hits]
            reference = next(layers for layers in prefixes if layers)
            for layer, (ref_keys, ref_values) in enumerate(reference):
                keys = [left_pad(kv[layer][0] if kv else ref_keys[:, :0], past) for kv in prefixes]
                values = [left_pad(kv[layer][1] if kv else ref_values[:, :0], past) for kv in prefixes]
                cache.update(torch.stack(keys), torch.stack(values), layer)
        logits = self.language.forward(batch, mask, pos.to(batch.device), cache)
        handoffs = []
        for row, (job, length, delta, c, n) in enumerate(zip(jobs, lengths, deltas, cached, suffixes)):
            generator = new_generator(job.sampling.seed)
            first = sample(logits[row], job.sampling, generator)
            layers = [tuple(torch.cat((t[row, :, past - c:past], t[row, :, past + width - n:]), dim=1)
                            for t in (layer.keys, layer.values)) for layer in cache.layers]
            if self.prefix_cache is not None:
                self.prefix_cache.store(hashes[row], layers)
            handoffs.append(KVHandoff(request_id=job.request_id, prompt_tokens=length, first_token=first,
                                      next_position=length, rope_delta=delta, sampling=job.sampling,
                                      generator_state=generator_state(generator), layers=layers,
                                      cached_tokens=c))
        return handoffs

