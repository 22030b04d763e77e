"""Moving tensors between stages, behind one interface per kind of transfer.

KV (prefill -> decode): decode reserves blocks, the KV is written into them over
the best path the pair shares (`kv_paths`: in-process adoption, shared memory,
CUDA IPC, NIXL, raw gRPC frames), then prefill commits the metadata. Embeddings
(encode -> prefill) travel the same way: by reference in one process, else
over gRPC."""

from .grpc_transport import ChannelPool, GrpcEmbeddingTransport
from .kv_receiver import KVReceiver, Reservation, ReservationTimeout, ReserveSpec
from .kv_sender import LOCAL_DECODERS, KVHandoffSink, KVSender

__all__ = ["ChannelPool", "GrpcEmbeddingTransport", "KVHandoffSink", "KVReceiver", "KVSender", "LOCAL_DECODERS",
           "Reservation", "ReservationTimeout", "ReserveSpec"]
