"""Moving tensors between stages. One small interface per kind of transfer;
the implementation here streams tensor bytes over gRPC. Device-to-device
transports (NCCL, NIXL-style) can be added behind the same interfaces."""

from .base import EmbeddingTransport, KVTransport
from .grpc_transport import ChannelPool, GrpcEmbeddingTransport, GrpcKVTransport

__all__ = ["ChannelPool", "EmbeddingTransport", "GrpcEmbeddingTransport", "GrpcKVTransport", "KVTransport"]
