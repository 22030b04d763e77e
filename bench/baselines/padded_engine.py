"""The engine epd had before the paged one, kept as a benchmark baseline only.

Prefill left-pads every prompt of a batch to the widest and runs the family's
transformers modules; decode keeps one left-padded `DynamicCache` that is laid
out again (every sequence's KV copied) whenever a sequence joins or leaves.
Greedy sampling, text prompts, 1-D RoPE (LLaVA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[1]
    return tensor if missing == 0 else torch.cat([tensor.new_zeros((tensor.shape[0], missing, tensor.shape[2])),
                                                  tensor], dim=1)


@dataclass
class PaddedCounters:
    padding_tokens: int = 0  # computed tokens that are padding
    useful_tokens: int = 0
    relayout_bytes: int = 0  # KV bytes copied to re-lay the batched cache out


class PaddedEngine:
    def __init__(self, language) -> None:
        self.language = language
        self.counters = PaddedCounters()

    def _forward(self, embeds, mask, positions, cache) -> torch.Tensor:
        out = self.language.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                       cache=cache, use_cache=True)
        return self.language.lm_head(out.last_hidden_state[:, -1]).float()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """First tokens and each prompt's KV per layer ([heads, length, dim])."""
        width = max(len(p) for p in prompts)
        device = self.language.device
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.counters.padding_tokens += int((mask == 0).sum())
        self.counters.useful_tokens += int(mask.sum())
        cache = DynamicCache(config=self.language.adapter.text_config)
        logits = self._forward(self.language.embed(ids), mask, positions, cache)
        kv = [[(layer.keys[row, :, width - len(p):], layer.values[row, :, width - len(p):]) for layer in cache.layers]
              for row, p in enumerate(prompts)]
        return logits.argmax(-1).tolist(), kv

    @torch.no_grad()
    def decode(self, kv: list[list[tuple[torch.Tensor, torch.Tensor]]], first: list[int], steps: int) -> int:
        """`steps` greedy steps of a batch built from per-sequence KV (one re-layout, as a join causes);
        returns tokens produced."""
        lengths = [k[0][0].shape[1] for k in kv]
        width = max(lengths)
        cache = DynamicCache(config=self.language.adapter.text_config)
        for layer in range(len(kv[0])):
            keys = torch.stack([_left_pad(seq[layer][0], width) for seq in kv])
            values = torch.stack([_left_pad(seq[layer][1], width) for seq in kv])
            self.counters.relayout_bytes += 2 * keys.numel() * keys.element_size()
            cache.update(keys, values, layer)
        mask = torch.zeros((len(kv), width), dtype=torch.long, device=self.language.device)
        for row, length in enumerate(lengths):
            mask[row, width - length:] = 1
        tokens = torch.tensor(first, device=self.language.device).view(-1, 1)
        for step in range(steps):
            mask = torch.cat([mask, mask.new_ones((len(kv), 1))], dim=1)
            positions = torch.tensor([length + step for length in lengths], device=mask.device).view(-1, 1)
            tokens = self._forward(self.language.embed(tokens), mask, positions, cache).argmax(-1).view(-1, 1)
        return steps * len(kv)
