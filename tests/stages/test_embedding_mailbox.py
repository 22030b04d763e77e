"""Embeddings from encode to prefill in shared memory: the mailbox against
real senders (memory files passed over its Unix socket, in this process or
from a thread), and real encode and prefill workers (gRPC over sockets, real
Redis) choosing it from prefill's discovery record, with gRPC as the fallback.
Workers of one process would hand embeddings over by reference; the tests that
want the shared-memory path take the prefill worker out of that table, as it
is for a prefill worker in another process."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import torch

from epd.workers import metrics
from epd.workers.stages.prefill import PrefillServicer
from epd.workers.stages.worker import Worker, WorkerConfig
from epd.workers.transport.embedding_transport import LOCAL_EMBEDDING_SINKS
from epd.workers.transport.kv_paths import host_id
from epd.workers.transport.shm_embeddings import (
    MAX_ITEMS,
    EmbeddingMailbox,
    EmbeddingRejected,
    send_embeddings,
)

from ..helpers import eventually

pytestmark = pytest.mark.timeout(300)


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class Collected:
    """A mailbox's `take`: keeps what it is given; refuses a push holding a key that starts with 'bad'."""

    def __init__(self) -> None:
        self.pushes: list[list[tuple[str, torch.Tensor]]] = []

    def __call__(self, items: list[tuple[str, torch.Tensor]]) -> None:
        if any(key.startswith("bad") for key, _ in items):
            raise ValueError("expected a floating [rows, 64] tensor")
        self.pushes.append(items)


@pytest.fixture
async def mailbox():
    before = shm_entries()
    taken = Collected()
    box = EmbeddingMailbox(taken, timeout=2.0)
    box.start()
    yield box, taken
    await box.stop()
    folder, name = box.path.rsplit("/", 1)
    assert name not in os.listdir(folder)  # the socket is gone
    assert shm_entries() == before  # memory files have no name: nothing can leak there


async def test_a_push_arrives_whole_and_exact(mailbox):
    box, taken = mailbox
    sent = {"a": torch.randn(16, 64, dtype=torch.bfloat16), "b": torch.randn(3, 64)}
    size = await asyncio.to_thread(send_embeddings, box.path, sent, 5.0)
    assert size == sum(t.nbytes for t in sent.values())
    [push] = taken.pushes
    assert [key for key, _ in push] == ["a", "b"]
    for key, tensor in push:
        assert tensor.dtype == sent[key].dtype and torch.equal(tensor, sent[key])


async def test_a_refused_push_stores_nothing_and_tells_the_sender_why(mailbox):
    box, taken = mailbox
    with pytest.raises(EmbeddingRejected, match=r"refused: expected a floating \[rows, 64\] tensor"):
        await asyncio.to_thread(send_embeddings, box.path, {"good": torch.zeros(2, 64), "bad": torch.zeros(2, 8)}, 5.0)
    assert taken.pushes == []


def _raw_push(path: str, message: bytes, fds: list[int]) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5.0)
        sock.connect(path)
        if message:
            socket.send_fds(sock, [message], fds)
        else:
            sock.shutdown(socket.SHUT_WR)  # a sender that died before writing
        return sock.recv(4096)


@pytest.mark.parametrize("message, error", [
    (b'{"items": [{"key": "a", "shape": [2, 64], "dtype": "float32"}]}', b"refused: 0 descriptors for 1 items"),
    (b"not json", b"refused: Expecting value"),
    (b'{"items": [{"key": "a", "shape": [2, 64], "dtype": "int64"}]}', b"refused: embedding dtype 'int64'"),
    (b'{"items": [{"key": "a", "shape": [99999, 64], "dtype": "float32"}]}', b"refused: shared memory of"),
])
async def test_malformed_pushes_are_refused_and_the_mailbox_keeps_serving(mailbox, message, error):
    box, taken = mailbox
    memory = os.memfd_create("test")
    os.ftruncate(memory, 2 * 64 * 4)
    fds = [memory] if b"int64" in message or b"99999" in message else []
    try:
        reply = await asyncio.to_thread(_raw_push, box.path, message, fds)
    finally:
        os.close(memory)
    assert reply.startswith(error), reply
    assert await asyncio.to_thread(_raw_push, box.path, b"", []) == b""  # gone before a word: nothing
    await asyncio.to_thread(send_embeddings, box.path, {"next": torch.ones(2, 64)}, 5.0)
    assert [[key for key, _ in push] for push in taken.pushes] == [["next"]]


async def start(redis_url: str, role: str, paths: str = "shm,grpc") -> Worker:
    worker = Worker(WorkerConfig(role=role, model="tiny-llava", redis_url=redis_url, kv_paths=paths,
                                 drain_timeout=0.0))
    await worker.start()
    return worker


@pytest.fixture
async def encode_and_prefill(redis_server, request):
    """An encode and a prefill worker; prefill allows the paths in `request.param`, and takes nothing
    by reference (as if it ran in another process)."""
    before = shm_entries()
    encode = await start(redis_server.url, "encode")
    prefill = await start(redis_server.url, "prefill", request.param)
    LOCAL_EMBEDDING_SINKS.pop(prefill.ctx.address)
    await eventually(lambda: any(w.address == prefill.ctx.address for w in encode.ctx.directory.live("prefill")))
    yield encode, prefill, next(s for s in prefill.servicers if isinstance(s, PrefillServicer))
    for worker in (encode, prefill):
        await worker.stop()
    assert shm_entries() == before


def pushed(path: str) -> float:
    return metrics.TRANSFER_BYTES.labels("embedding", path)._value.get()


@pytest.mark.parametrize("encode_and_prefill", ["shm,grpc"], indirect=True)
async def test_encode_pushes_to_a_prefill_worker_of_its_host_in_shared_memory(encode_and_prefill):
    encode, prefill, stage = encode_and_prefill
    [record] = [w for w in encode.ctx.directory.live("prefill") if w.address == prefill.ctx.address]
    assert record.host_id == host_id() and record.embedding_socket == stage.mailbox.path
    hidden = stage.embeddings.language.hidden_size
    embedding = torch.randn(16, hidden)
    before = pushed("shm"), pushed("grpc")
    await encode.ctx.embeddings.push(prefill.ctx.address, "r1", encode.ctx.address, {"img-1": embedding})
    assert torch.equal(stage.embeddings.buffer.get("img-1"), embedding)
    assert (pushed("shm"), pushed("grpc")) == (before[0] + embedding.nbytes, before[1])
    # more items than one message carries descriptors for: several messages
    many = {f"tile-{i}": torch.full((4, hidden), float(i)) for i in range(MAX_ITEMS + 6)}
    await encode.ctx.embeddings.push(prefill.ctx.address, "r3", encode.ctx.address, many)
    assert all(torch.equal(stage.embeddings.buffer.get(key), tensor) for key, tensor in many.items())
    assert pushed("grpc") == before[1]
    # an embedding that does not fit the model is refused whole, as over gRPC
    with pytest.raises(EmbeddingRejected, match="embedding img-3: expected a floating"):
        await encode.ctx.embeddings.push(prefill.ctx.address, "r2", encode.ctx.address,
                                         {"img-2": embedding, "img-3": torch.randn(16, hidden + 1)})
    assert stage.embeddings.buffer.get("img-2") is None


@pytest.mark.parametrize("encode_and_prefill", ["shm,grpc"], indirect=True)
async def test_a_mailbox_that_is_gone_falls_back_to_grpc(encode_and_prefill):
    encode, prefill, stage = encode_and_prefill
    os.unlink(stage.mailbox.path)  # e.g. prefill restarted on the same address with a new mailbox
    embedding = torch.randn(16, stage.embeddings.language.hidden_size)
    before = pushed("shm"), pushed("grpc")
    await encode.ctx.embeddings.push(prefill.ctx.address, "r1", encode.ctx.address, {"img-1": embedding})
    assert torch.equal(stage.embeddings.buffer.get("img-1"), embedding)
    assert pushed("shm") == before[0] and pushed("grpc") > before[1]


@pytest.mark.parametrize("encode_and_prefill", ["grpc"], indirect=True)
async def test_a_prefill_worker_without_shm_gets_embeddings_over_grpc(encode_and_prefill):
    encode, prefill, stage = encode_and_prefill
    assert stage.mailbox is None
    assert [w.embedding_socket for w in encode.ctx.directory.live("prefill")] == [""]
    embedding = torch.randn(16, stage.embeddings.language.hidden_size)
    before = pushed("shm"), pushed("grpc")
    await encode.ctx.embeddings.push(prefill.ctx.address, "r1", encode.ctx.address, {"img-1": embedding})
    assert torch.equal(stage.embeddings.buffer.get("img-1"), embedding)
    assert pushed("shm") == before[0] and pushed("grpc") > before[1]


async def test_descriptors_sent_without_a_header_are_closed(mailbox):
    box, taken = mailbox

    def descriptors_alone() -> bytes:
        memory = os.memfd_create("test")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(5.0)
                sock.connect(box.path)
                socket.send_fds(sock, [b""], [memory])
                return sock.recv(4096)
        finally:
            os.close(memory)

    open_before = len(os.listdir("/proc/self/fd"))
    assert await asyncio.to_thread(descriptors_alone) == b""  # no header: no answer, nothing stored
    await eventually(lambda: len(os.listdir("/proc/self/fd")) == open_before)  # the mailbox closed what it got
    assert taken.pushes == []
