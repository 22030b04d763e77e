"""Protobuf <-> internal messages, at the process edge only."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from epd.v1 import stages_pb2 as pb

from .engine.kv_pool import KVLayout
from .engine.tensors import PackedTensor, pack, unpack
from .messages import EncodeItem, GeneratedChunk, ImageRef, KVHandoff, PrefillCall, SamplingParams

# Trailing metadata of a failed call that blames a peer of the failing stage (prefill failing because
# its decode worker is gone): the router retries elsewhere without that peer. Structured, so nobody
# parses error text for it.
FAILED_STAGE_KEY = "epd-failed-stage"
FAILED_ADDRESS_KEY = "epd-failed-address"


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    packed = pack(tensor)
    return pb.Tensor(shape=list(packed.shape), dtype=packed.dtype, data=packed.data)


def tensor_from_proto(message: pb.Tensor) -> torch.Tensor:
    return unpack(PackedTensor(tuple(message.shape), message.dtype, message.data))


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    message = pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                max_tokens=params.max_tokens, stop=list(params.stop), ignore_eos=params.ignore_eos)
    if params.seed is not None:
        message.seed = params.seed
    return message


def sampling_from_proto(message: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(max_tokens=message.max_tokens, temperature=message.temperature, top_p=message.top_p or 1.0,
                          top_k=message.top_k, seed=message.seed if message.HasField("seed") else None,
                          stop=tuple(message.stop), ignore_eos=message.ignore_eos)


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                       block_size=layout.block_size, dtype=str(layout.dtype).removeprefix("torch."))


def layout_from_proto(message: pb.KVLayout) -> KVLayout:
    dtype = getattr(torch, message.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {message.dtype!r}")
    return KVLayout(message.num_layers, message.num_kv_heads, message.head_dim, message.block_size, dtype)


def handoff_from_commit(message: pb.CommitKVRequest) -> KVHandoff:
    return KVHandoff(request_id=message.request_id, prompt_tokens=message.prompt_tokens,
                     first_token=message.first_token, next_position=message.next_position,
                     rope_delta=message.rope_delta, sampling=sampling_from_proto(message.sampling),
                     generator_state=message.generator_state, cached_tokens=message.cached_tokens)


def encode_item_to_proto(item: EncodeItem, image: bytes = b"") -> pb.EncodeItem:
    """`image`: the image's bytes, for an item sent to an encode worker (inside an ImageRef they travel once)."""
    return pb.EncodeItem(item_key=item.item_key, image=image, tile_index=item.tile_index, n_tokens=item.n_tokens,
                         dispatched=item.dispatched)


def image_ref_to_proto(ref: ImageRef) -> pb.ImageRef:
    return pb.ImageRef(image_key=ref.image_key, image=ref.image, items=[encode_item_to_proto(i) for i in ref.items],
                       width=ref.size.width, height=ref.size.height)


def prefill_to_proto(call: PrefillCall) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=call.request_id, input_ids=call.input_ids,
                             images=[image_ref_to_proto(ref) for ref in call.images],
                             sampling=sampling_to_proto(call.sampling), decode_address=call.decode_address)


def chunk_from_proto(message: pb.GenerateChunk) -> GeneratedChunk:
    return GeneratedChunk(tuple(message.token_ids), message.text, message.finish_reason)


def failed_peer_metadata(stage: str, address: str) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for `context.abort(..., trailing_metadata=...)` naming the peer at fault."""
    return ((FAILED_STAGE_KEY, stage), (FAILED_ADDRESS_KEY, address))


def failed_peer(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, str] | None:
    """The (stage, address) a failed call's trailing metadata blames, if any."""
    found = {key: value if isinstance(value, str) else value.decode() for key, value in metadata or ()}
    if FAILED_STAGE_KEY in found and FAILED_ADDRESS_KEY in found:
        return found[FAILED_STAGE_KEY], found[FAILED_ADDRESS_KEY]
    return None
