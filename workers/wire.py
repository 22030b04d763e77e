"""Protobuf <-> internal messages, at the process edge only."""

from __future__ import annotations

import torch

from epd.v1 import stages_pb2 as pb

from .engine.tensors import PackedTensor, pack, unpack
from .messages import KVHandoff, SamplingParams


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


def handoff_to_chunks(handoff: KVHandoff):
    """The KV stream: a header, then one message per layer (layer-wise transfer)."""
    header = pb.KVHeader(prompt_tokens=handoff.prompt_tokens, first_token=handoff.first_token,
                         next_position=handoff.next_position, rope_delta=handoff.rope_delta,
                         sampling=sampling_to_proto(handoff.sampling), generator_state=handoff.generator_state,
                         num_layers=len(handoff.layers))
    yield pb.KVChunk(request_id=handoff.request_id, header=header)
    for index, (key, value) in enumerate(handoff.layers):
        yield pb.KVChunk(request_id=handoff.request_id,
                         layer=pb.KVLayer(layer=index, key=tensor_to_proto(key), value=tensor_to_proto(value)))


def handoff_from_chunks(request_id: str, header: pb.KVHeader, layers: list[pb.KVLayer]) -> KVHandoff:
    if len(layers) != header.num_layers:
        raise ValueError(f"request {request_id}: expected {header.num_layers} KV layers, got {len(layers)}")
    ordered = sorted(layers, key=lambda layer: layer.layer)
    return KVHandoff(request_id=request_id, prompt_tokens=header.prompt_tokens, first_token=header.first_token,
                     next_position=header.next_position, rope_delta=header.rope_delta,
                     sampling=sampling_from_proto(header.sampling), generator_state=header.generator_state,
                     layers=[(tensor_from_proto(layer.key), tensor_from_proto(layer.value)) for layer in ordered])
