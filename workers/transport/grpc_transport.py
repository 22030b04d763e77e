"""gRPC channels to peers (mutual TLS when configured), and embeddings encode -> prefill over them."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..security.tls import TLSFiles
from ..wire import tensor_from_proto, tensor_to_proto

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   # KV frames are megabytes: read the socket in large chunks
                   ("grpc.experimental.tcp_min_read_chunk_size", 4 << 20),
                   ("grpc.experimental.tcp_max_read_chunk_size", 64 << 20),
                   ("grpc.experimental.tcp_read_chunk_size", 16 << 20)]


class ChannelPool:
    """One channel per peer address, reused across calls: mutual TLS with `tls`, else plain
    (loopback only). Renewed certificate files are noticed within `recheck` seconds; calls
    after that use new channels, and calls already running finish on the old ones."""

    def __init__(self, tls: TLSFiles | None = None, recheck: float = 30.0) -> None:
        self.tls = tls
        self.recheck = recheck
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._credentials = tls.channel_credentials() if tls else None
        self._stamp = tls.stamp() if tls else None
        self._checked = time.monotonic()

    def get(self, address: str) -> grpc.aio.Channel:
        if self.tls is not None and time.monotonic() - self._checked > self.recheck:
            self._reload_if_renewed()
        channel = self._channels.get(address)
        if channel is None:
            channel = (grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
                       if self._credentials else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
            self._channels[address] = channel
        return channel

    def _reload_if_renewed(self) -> None:
        self._checked = time.monotonic()
        tls = self.tls
        stamp = tls.stamp() if tls is not None else None
        if tls is None or stamp is None or stamp == self._stamp:
            return
        self._credentials, self._stamp = tls.channel_credentials(), stamp
        self._retired.extend(self._channels.values())
        self._channels = {}

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()
        self._retired.clear()


# address -> the prefill worker in this process that takes embeddings (key, tensor) by reference
LOCAL_EMBEDDING_SINKS: dict[str, Callable[[str, torch.Tensor], None]] = {}


class GrpcEmbeddingTransport:
    """Embeddings to a prefill worker: by reference when it runs in this process (colocated), else over
    its gRPC service."""

    def __init__(self, channels: ChannelPool, timeout: float = 30.0) -> None:
        self.channels = channels
        self.timeout = timeout

    async def push(self, address: str, request_id: str, owner: str, embeddings: dict[str, torch.Tensor]) -> None:
        local = LOCAL_EMBEDDING_SINKS.get(address)
        if local is not None:
            for key, tensor in embeddings.items():
                local(key, tensor)
            metrics.TRANSFER_BYTES.labels("embedding", "inproc").inc(0)  # handed over, nothing copied
            return
        start = time.perf_counter()
        chunks = [pb.EmbeddingChunk(request_id=request_id, item_key=key, owner_address=owner,
                                    embedding=tensor_to_proto(tensor)) for key, tensor in embeddings.items()]
        stub = pb_grpc.PrefillServiceStub(self.channels.get(address))
        await stub.PushEmbeddings(iter(chunks), timeout=self.timeout)
        metrics.TRANSFER_BYTES.labels("embedding", "grpc").inc(sum(len(c.embedding.data) for c in chunks))
        metrics.TRANSFER_LATENCY.labels("embedding", "grpc").observe(time.perf_counter() - start)

    async def fetch(self, owner: str, item_key: str) -> torch.Tensor | None:
        stub = pb_grpc.EncodeServiceStub(self.channels.get(owner))
        try:
            tensor = await stub.FetchEmbedding(pb.FetchEmbeddingRequest(item_key=item_key), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise
        metrics.TRANSFER_BYTES.labels("embedding_fetch", "grpc").inc(len(tensor.data))
        return tensor_from_proto(tensor)
