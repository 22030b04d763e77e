"""Our own decoder forward over packed batches.

All new tokens of all sequences form one `[T, hidden]` tensor: projections,
norms and MLPs run once over it with no padding, RoPE uses each token's own
position (M-RoPE for Qwen2-VL), the new keys and values go straight into the
paged pool, and attention reads each sequence's blocks. Weights are those of
the family's transformers modules (loaded from the same safetensors), and the
element-wise steps call the family's own functions, so results match
`model.generate` token for token."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..models import LanguagePartBase
from .attention import AttentionBackend
from .batch import PackedBatch
from .compiled import DenseParts
from .kv_pool import KVLayout, KVPool
from .step_threads import StepThreads


def kv_layout(language: LanguagePartBase, block_size: int, dtype: torch.dtype | None = None) -> KVLayout:
    """The KV block shape of a language part."""
    config = language.adapter.text_config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return KVLayout(num_layers=int(config.num_hidden_layers), num_kv_heads=int(config.num_key_value_heads),
                    head_dim=head_dim, block_size=block_size, dtype=dtype or language.dtype)


class PackedDecoder:
    """The language model's forward for the prefill and decode engines."""

    def __init__(self, language: LanguagePartBase, pool: KVPool, attention: AttentionBackend,
                 compiled: bool = False, threads: StepThreads | None = None) -> None:
        self.language = language
        self.threads = threads or StepThreads()
        self.pool = pool
        self.attention = attention
        self.dense = DenseParts(compiled)
        model = language.text_model
        # the family's own rotary application (exactness); every layer uses the same function
        self.apply_rotary = sys.modules[type(model.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.layers = self.dense.layers(list(model.layers))
        self.norm = model.norm
        self.rotary = model.rotary_emb
        self.head_dim = pool.layout.head_dim

    @property
    def device(self) -> torch.device:
        return self.language.device

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the layers' dense parts now (if they are compiled), not under the first requests."""
        config = self.language.adapter.text_config

        def rotary(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
            positions = self.language.text_positions_of(list(range(tokens))).to(self.device)
            cos, sin = self.rotary(self.norm.weight.new_zeros((1, tokens, 1)),
                                   self.language.rotary_position_ids(positions))
            return cos[0], sin[0]

        self.dense.warm_up(self.layers[0], rotary, self.apply_rotary, self.head_dim, int(config.hidden_size),
                           int(config.num_attention_heads), self.threads.counts(self.device))

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, batch: PackedBatch,
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Float32 next-token logits of `batch.logits_rows` (every row when `logits_index` is None), from
        `[T, hidden]` input embeddings.
        `on_layer(i)` runs once layer i's keys and values are in the pool (layer-wise KV transfer)."""
        with self.threads.for_forward(self.device, embeds.shape[0]), self.dense.unguarded():
            return self._forward(embeds, batch, on_layer)

    def _forward(self, embeds: torch.Tensor, batch: PackedBatch, on_layer: Callable[[int], None] | None) -> torch.Tensor:
        hidden = embeds.unsqueeze(0)
        cos, sin = self.rotary(hidden, self.language.rotary_position_ids(batch.packed_positions().to(self.device)))
        cos, sin = cos[0], sin[0]  # [T, head_dim]
        for index, layer in enumerate(self.layers):
            query, keys, values = self.dense.attention_inputs(layer, hidden, cos, sin, self.apply_rotary,
                                                              self.head_dim)
            self.pool.write(index, batch.slot_tensor, keys, values)
            if on_layer is not None:
                on_layer(index)
            hidden = self.dense.layer_output(layer, hidden, self.attention.attend(index, query, keys, values, batch))
        hidden = self.norm(hidden)[0]
        if batch.logits_index is not None:
            hidden = hidden.index_select(0, batch.logits_index)
        logits: torch.Tensor = self.language.lm_head(hidden)
        return logits.float()
