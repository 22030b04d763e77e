"""Embeddings from an encode worker to a prefill worker over the best path the
pair has: by reference when prefill runs in this process (`--colocated`), in
shared memory when it runs on this host and publishes an embedding mailbox
(`shm_embeddings`), else over its gRPC service. Pulls of an embedding from the
encode worker that holds it (prefill's fallback) use gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from .. import metrics
from ..registry import WorkerDirectory
from ..wire import tensor_from_proto, tensor_to_proto
from .grpc_transport import ChannelPool
from .kv_paths import host_id
from .shm_embeddings import MAX_ITEMS, send_embeddings

log = logging.getLogger(__name__)

# address -> the prefill worker in this process that takes embeddings (key, tensor) by reference
LOCAL_EMBEDDING_SINKS: dict[str, Callable[[str, torch.Tensor], None]] = {}


class EmbeddingTransport:
    def __init__(self, channels: ChannelPool, directory: WorkerDirectory, timeout: float = 30.0) -> None:
        self.channels = channels
        self.directory = directory  # where a prefill worker publishes its host and mailbox
        self.timeout = timeout

    async def push(self, address: str, request_id: str, owner: str, embeddings: dict[str, torch.Tensor]) -> None:
        local = LOCAL_EMBEDDING_SINKS.get(address)
        if local is not None:
            for key, tensor in embeddings.items():
                local(key, tensor)
            metrics.TRANSFER_BYTES.labels("embedding", "inproc").inc(0)  # handed over, nothing copied
            return
        start = time.perf_counter()
        mailbox = self._mailbox(address)
        if mailbox:
            items = list(embeddings.items())
            try:  # at most MAX_ITEMS descriptors per message (anyres images have many tiles)
                sent = sum([await asyncio.to_thread(send_embeddings, mailbox, dict(items[i:i + MAX_ITEMS]),
                                                    self.timeout) for i in range(0, len(items), MAX_ITEMS)])
            except OSError as exc:  # gone, or restarted with another mailbox: gRPC still reaches it
                log.warning("embeddings for %s: shared memory to %s failed (%r); sending over gRPC",
                            request_id, address, exc)
            else:
                metrics.TRANSFER_BYTES.labels("embedding", "shm").inc(sent)
                metrics.TRANSFER_LATENCY.labels("embedding", "shm").observe(time.perf_counter() - start)
                return
        chunks = [pb.EmbeddingChunk(request_id=request_id, item_key=key, owner_address=owner,
                                    embedding=tensor_to_proto(tensor)) for key, tensor in embeddings.items()]
        stub = pb_grpc.PrefillServiceStub(self.channels.get(address))
        await stub.PushEmbeddings(iter(chunks), timeout=self.timeout)
        metrics.TRANSFER_BYTES.labels("embedding", "grpc").inc(sum(len(c.embedding.data) for c in chunks))
        metrics.TRANSFER_LATENCY.labels("embedding", "grpc").observe(time.perf_counter() - start)

    def _mailbox(self, address: str) -> str:
        """The embedding mailbox of the prefill worker at `address`, if it runs on this host."""
        for info in self.directory.live("prefill"):
            if info.address == address and info.embedding_socket and info.host_id == host_id():
                return info.embedding_socket
        return ""

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
