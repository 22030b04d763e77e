"""Internal request-state messages shared by the router, the stage servers and
the engines. gRPC messages stay at the process edge (`epd.workers.wire`) and are
converted to these; engines never see protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from epd.image_size import ImageSize

if TYPE_CHECKING:
    import torch

    from .engine.prefill import KVSink, PrefixHit

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style sampling settings; temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image in the conversation; `index` is its position among all images of the request."""

    index: int


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    parts: tuple[TextPart | ImagePart, ...]


@dataclass(frozen=True)
class EncodeItem:
    """One piece of an image that the vision tower encodes on its own (the whole image, or a tile)."""

    item_key: str  # content key of its embedding (epd.workers.cache.item_key)
    tile_index: int  # -1: the whole image
    n_tokens: int  # rows of embedding it becomes
    dispatched: bool = False  # the router sent it to an encode worker for this attempt (prefill waits for it)


@dataclass(frozen=True)
class ImageRef:
    """An image of a request as the stages see it: its content key, bytes (kept so that prefill
    can recompute a miss), size and items in order."""

    image_key: str
    image: bytes
    size: ImageSize
    items: tuple[EncodeItem, ...]


@dataclass(frozen=True)
class PrefillCall:
    """What the router asks a prefill worker: prefill this prompt and hand the KV to `decode_address`."""

    request_id: str
    input_ids: list[int]
    images: list[ImageRef]
    sampling: SamplingParams
    decode_address: str


@dataclass(frozen=True)
class GeneratedChunk:
    """Tokens a decode worker streams back: their ids, their new text, and the finish reason once done."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""  # "", "stop" or "length"


@dataclass
class PrefillJob:
    """Everything a prefill forward needs, embeddings already merged per image."""

    request_id: str
    input_ids: list[int]
    image_embeddings: list[torch.Tensor | None]  # [n_tokens, hidden] per image, prompt order; None: in `prefix`
    image_sizes: list[ImageSize]
    sampling: SamplingParams
    image_keys: list[str] = field(default_factory=list)  # content keys, prompt order (name prefix-cache blocks)
    prefix: PrefixHit | None = None  # cached prefix found at admission (else the engine looks it up)
    prefix_blocks: list[str] | None = None  # its prompt's block hashes, once computed
    kv_sink: KVSink | None = None  # where its KV streams, layer by layer, as it is computed


@dataclass
class KVHandoff:
    """The prefill -> decode handoff's metadata: all decode needs to continue the sequence besides the
    KV itself, which the transport moves into decode's pool."""

    request_id: str
    prompt_tokens: int
    first_token: int
    next_position: int  # cache length == index of the next token
    rope_delta: int  # M-RoPE offset from prefill (0 for 1-D RoPE models)
    sampling: SamplingParams
    generator_state: bytes  # torch.Generator state after sampling the first token
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (reported)
    block_table: list[int] = field(default_factory=list)  # the prompt's blocks in the sender's pool


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as decode reports it; `text` is the new detokenized text."""

    request_id: str
    token_id: int
    text: str
    finish_reason: FinishReason | None = None
