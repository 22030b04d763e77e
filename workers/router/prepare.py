"""A validated chat request turned into what the stages take: prompt ids with
image placeholders expanded, one ImageRef per image, the sampling settings;
and the same request continued after a lost decode worker."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..cache import block_hashes, image_key, item_key
from ..messages import EncodeItem, ImageRef, SamplingParams
from ..models import ModelAdapter
from .errors import APIError
from .images import FetchedImage
from .prompt import PromptEncoder
from .schema import ChatRequest

UINT64 = 2**64


@dataclass
class PreparedRequest:
    request_id: str  # what the client sees
    input_ids: list[int]
    images: list[ImageRef]
    chat: ChatRequest
    sampling: SamplingParams
    image_tokens: list[int]  # placeholder rows of each image (names prompt blocks)
    prefix_blocks: list[str] = field(default_factory=list)  # chained block hashes (prefix-affinity routing)
    block_size: int = 0  # tokens per prefix block (the prefill workers' KV block size); 0: not hashed
    prompt_tokens: int = 0  # the client's prompt; usage reports it even after a resume
    stage_request_id: str = ""  # the id the stages know this attempt by
    cached_tokens: int = 0  # prompt tokens prefill took from its prefix KV cache (usage reports them)

    def __post_init__(self) -> None:
        self.prompt_tokens = self.prompt_tokens or len(self.input_ids)
        self.stage_request_id = self.stage_request_id or self.request_id

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    def retried(self, attempt: int) -> PreparedRequest:
        """The same request under a fresh stage id (nothing was produced yet)."""
        return replace(self, stage_request_id=f"{self.request_id}.{attempt}", cached_tokens=0)

    def continued(self, produced: Sequence[int], attempt: int, image_token_id: int) -> PreparedRequest:
        """The request resumed after `produced` tokens: prompt + those tokens are prefilled again
        and generation goes on for the tokens still allowed. Greedy output is unchanged; a
        sampled one goes on with the seed advanced by the tokens produced (a fresh random seed
        if the client gave none), since the lost worker's generator state went with it."""
        ids = self.input_ids + list(produced)
        seed = self.sampling.seed
        if not self.sampling.greedy and seed is not None:
            seed = (seed + len(produced)) % UINT64
        sampling = replace(self.sampling, max_tokens=self.sampling.max_tokens - len(produced), seed=seed)
        blocks = block_hashes(ids, image_token_id, [ref.image_key for ref in self.images], self.image_tokens,
                              self.block_size) if self.block_size else []
        return replace(self, input_ids=ids, sampling=sampling, prefix_blocks=blocks, cached_tokens=0,
                       stage_request_id=f"{self.request_id}.{attempt}")


def prepare(adapter: ModelAdapter, encoder: PromptEncoder, chat: ChatRequest, images: list[FetchedImage],
            default_max_tokens: int, block_size: int | None) -> PreparedRequest:
    """Prompt ids with image placeholders expanded, one ImageRef per image, and the prompt's block
    hashes at `block_size` (None: no prefill worker published one yet, no hashes); APIError 400 if
    the prompt (images included) leaves no room for the answer. Runs off the event loop."""
    try:
        ids = encoder.encode(list(chat.messages), [image.size for image in images])
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request", "messages") from exc
    room = adapter.max_context - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt is {len(ids)} tokens (images included), longer than the model's context "
                            f"of {adapter.max_context} tokens", "context_length_exceeded", "messages")
    max_tokens = chat.max_tokens if chat.max_tokens is not None else min(default_max_tokens, room)
    if len(ids) + max_tokens > adapter.max_context:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                            f"of {adapter.max_context} tokens", "context_length_exceeded", "max_tokens")
    refs = []
    for image in images:
        key = image_key(adapter.model_id, adapter.processor_fingerprint, image.data)
        counts = adapter.image_items(image.size)
        tiles = [-1] if len(counts) == 1 else list(range(len(counts)))
        items = tuple(EncodeItem(item_key(key, tile), tile, n) for tile, n in zip(tiles, counts, strict=True))
        refs.append(ImageRef(key, image.data, image.size, items))
    rows = [adapter.image_tokens(image.size) for image in images]
    blocks = block_hashes(ids, adapter.image_token_id, [ref.image_key for ref in refs], rows,
                          block_size) if block_size else []
    return PreparedRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, refs, chat, chat.sampling(max_tokens), rows, blocks,
                           block_size or 0)
