"""KV handoff throughput between two processes, per path, against memcpy of
the same bytes measured in the same run (the physical limit here).

    python -m epd.bench.kv_transfer [--sizes-mb 64,256,1024] --out bench/results/kv_transfer.json

A child process serves a decode worker's handoff side (the real
`DecodeServicer` RPCs, `KVReceiver`, its data paths and block pool; only the
model is left out: a pool of LLaVA-1.5-7B's KV shape, bf16, 512 KiB per token)
and the parent sends like a prefill worker (the real `KVSender`): reserve,
write every layer's blocks, wait for the data path. The time is from the first
layer write to the data path's end.

With `grpc` among the paths, grpcio's own ceiling is measured too: the same
bytes in the same frame size, ready-made, from one process to a handler that
only counts them (what any Python sender over gRPC could reach here).

Embedding pushes (encode -> prefill) are measured the same way, per path
(`shm`, `grpc`): the real `EmbeddingTransport.push` of a LLaVA-1.5-7B request
with 4 images (4 x 576 x 4096 bf16, 18.9 MB) to a child that serves prefill's
receiving side (the shared-memory mailbox, or the gRPC method turning each
chunk back into a tensor), timed from the push's start to prefill's answer."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from functools import partial
from typing import Any, cast

import grpc
import torch

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc

from ..workers.engine import DecodeEngine
from ..workers.engine.block_allocator import BlockAllocator
from ..workers.engine.kv_pool import KVLayout, KVPool
from ..workers.registry import WorkerDirectory, WorkerInfo
from ..workers.stages.context import WorkerContext
from ..workers.stages.decode import DecodeServicer
from ..workers.transport.embedding_transport import EmbeddingTransport
from ..workers.transport.grpc_transport import CHANNEL_OPTIONS, ChannelPool
from ..workers.transport.kv_paths import PATHS, host_id, nixl_available
from ..workers.transport.kv_receiver import TcpEndpoint
from ..workers.transport.kv_sender import KVSender
from ..workers.transport.nixl_path import NixlAgent
from ..workers.transport.raw_frames import FRAME_BYTES
from ..workers.transport.shm import SharedPool
from ..workers.transport.shm_embeddings import EmbeddingMailbox
from ..workers.wire import tensor_from_proto
from .report import write_json

LAYOUT = KVLayout(num_layers=32, num_kv_heads=32, head_dim=128, block_size=16, dtype=torch.bfloat16)
EMBEDDINGS = (4, 576, 4096)  # a LLaVA-1.5-7B request with 4 images: items, tokens per item, hidden (bf16)


class BlockReserver:
    """The decode engine's reservation side over a real pool, without a model to decode with."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.allocator = BlockAllocator(pool.num_blocks, 0)
        self.reserved: dict[str, list[int]] = {}

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int, adopt: bool = False) -> list[int]:
        self.reserved[request_id] = self.allocator.allocate(self.pool.layout.blocks_for(prompt_tokens))
        return self.reserved[request_id]

    def release(self, request_id: str, adopted_blocks: list[int] | None = None) -> bool:
        blocks = self.reserved.pop(request_id, None)
        if blocks is not None:
            self.allocator.free_blocks(blocks)
        return blocks is not None


def decode_side(blocks: int, paths: str, ready) -> None:
    async def serve() -> None:
        shared = SharedPool() if "shm" in paths else None
        pool = KVPool(LAYOUT, blocks, allocate=shared.allocate if shared else None)
        # A worker that has served a while has touched every block of its pool; a fresh one pays a
        # page fault per 4 KiB on first write (about 1 GB/s here), which is not the handoff's cost.
        pool.kv.zero_()
        nixl = NixlAgent("decode", pool.kv) if "nixl" in paths else None
        # only the reservation side of a decode worker is exercised: no context, no model
        servicer = DecodeServicer(ctx=cast(WorkerContext, None), engine=cast(DecodeEngine, BlockReserver(pool)),
                                  shared_fd=shared.fd if shared else None,
                                  kv_paths=frozenset(paths.split(",")), nixl=nixl,
                                  tcp=TcpEndpoint("127.0.0.1") if "tcp" in paths else None)
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        pb_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers(servicer.generic_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.receiver.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(serve())


async def send(address: str, path: str, sizes: list[int], repeats: int) -> dict:
    tokens = [size // LAYOUT.bytes_per_token for size in sizes]
    pool = KVPool(LAYOUT, LAYOUT.blocks_for(max(tokens)))
    pool.kv.normal_()
    sender = KVSender(ChannelPool(), pool, allowed=frozenset({path, "grpc"}))
    results = {}
    for size, count in zip(sizes, tokens, strict=True):
        table = list(range(LAYOUT.blocks_for(count)))
        times = []
        for attempt in range(repeats + 1):
            sink = await sender.open(address, f"{size}.{attempt}", count, 1)
            start = time.perf_counter()
            for layer in range(LAYOUT.num_layers):
                sink.write_layer(layer, table)
            await sink.finish()
            if attempt:  # the first one warms the path up (mapping, agents, connections)
                times.append(time.perf_counter() - start)
            assert sink.path == path, f"asked for {path}, got {sink.path}"
            await sink.abort()  # give the reservation back
        seconds = sorted(times)[len(times) // 2]
        results[f"{size >> 20}MB"] = {"bytes": count * LAYOUT.bytes_per_token, "seconds": seconds,
                                      "bytes_per_s": count * LAYOUT.bytes_per_token / seconds}
    return results


def counting_server(ready) -> None:
    """A raw-bytes stream handler that only counts what arrives (grpcio's ceiling, receiving side)."""
    async def serve() -> None:
        async def count(frames, context) -> bytes:
            return str(sum([len(frame) async for frame in frames])).encode()

        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Count", {"Write": grpc.stream_unary_rpc_method_handler(count)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(serve())


async def grpcio_ceiling(address: str, sizes: list[int], repeats: int) -> dict:
    """Ready-made frames of FRAME_BYTES streamed to the counting server: no copy or work of ours."""
    frame = bytes(FRAME_BYTES)
    results = {}
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call: grpc.aio.StreamUnaryMultiCallable = channel.stream_unary("/bench.Count/Write")

        async def frames(size: int):
            for _ in range(size // FRAME_BYTES):
                yield frame

        for size in sizes:
            times = []
            for attempt in range(repeats + 1):
                start = time.perf_counter()
                await call(frames(size))
                if attempt:
                    times.append(time.perf_counter() - start)
            results[f"{size >> 20}MB"] = {"bytes_per_s": size // FRAME_BYTES * FRAME_BYTES / sorted(times)[len(times) // 2]}
    return results


class PushReceiver(pb_grpc.PrefillServiceServicer):
    """Prefill's receiving side of embedding pushes over gRPC, without a model: each chunk back to a tensor."""

    async def PushEmbeddings(self, request_iterator, context) -> pb.PushAck:
        received = [tensor_from_proto(chunk.embedding) async for chunk in request_iterator]
        return pb.PushAck(received=len(received))


def prefill_side(ready) -> None:
    """Serve embedding pushes: the shared-memory mailbox and the gRPC method."""
    async def serve() -> None:
        mailbox = EmbeddingMailbox(lambda items: None)
        mailbox.start()
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        pb_grpc.add_PrefillServiceServicer_to_server(PushReceiver(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send((port, mailbox.path))
        await server.wait_for_termination()

    asyncio.run(serve())


async def push_embeddings(address: str, mailbox: str, repeats: int) -> dict:
    """The real transport's push of EMBEDDINGS to `address`, over shared memory and over gRPC."""
    directory = WorkerDirectory(cast(Any, None))  # discovery without Redis: prefill's record, as published
    transport = EmbeddingTransport(ChannelPool(), directory)
    items, rows, hidden = EMBEDDINGS
    embeddings = {f"item-{i}": torch.randn(rows, hidden).to(torch.bfloat16) for i in range(items)}
    size = sum(t.nbytes for t in embeddings.values())
    results = {}
    for path, socket_path in (("shm", mailbox), ("grpc", "")):
        directory.workers["prefill"] = [WorkerInfo("prefill", address, "bench", 0, host_id=host_id(),
                                                   embedding_socket=socket_path)]
        times = []
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            await transport.push(address, f"r{attempt}", "bench", embeddings)
            if attempt:
                times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        results[path] = {"bytes": size, "seconds": seconds, "bytes_per_s": size / seconds}
    return results


def in_child(context, target, run):
    """Start `target(pipe)` in a child process, `run(address, *rest)` against it (the child sends its port,
    or its port and the rest), then stop the child."""
    ours, theirs = context.Pipe()
    child = context.Process(target=target, args=(theirs,), daemon=True)
    child.start()
    message = ours.recv()
    port, *rest = message if isinstance(message, tuple) else (message,)
    try:
        return asyncio.run(run(f"127.0.0.1:{port}", *rest))
    finally:
        child.terminate()
        child.join(10)


def memcpy(sizes: list[int], repeats: int) -> dict:
    results = {}
    for size in sizes:
        src, dst = torch.empty(size, dtype=torch.uint8).random_(), torch.empty(size, dtype=torch.uint8)
        dst.copy_(src)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        results[f"{size >> 20}MB"] = {"bytes_per_s": size / sorted(times)[len(times) // 2]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="64,256,1024")
    parser.add_argument("--paths", default=",".join(p for p in PATHS if p in ("shm", "tcp", "grpc")
                                                    or (p == "nixl" and nixl_available())))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sizes = [int(mb) << 20 for mb in args.sizes_mb.split(",")]
    report: dict[str, Any] = {"layout": str(LAYOUT), "memcpy": memcpy(sizes, args.repeats), "paths": {}}
    blocks = LAYOUT.blocks_for(max(sizes) // LAYOUT.bytes_per_token) + 2
    context = mp.get_context("spawn")
    for path in args.paths.split(","):
        report["paths"][path] = in_child(context, partial(decode_side, blocks, f"{path},grpc"),
                                         lambda address, path=path: send(address, path, sizes, args.repeats))
        for name, entry in report["paths"][path].items():
            entry["of_memcpy"] = entry["bytes_per_s"] / report["memcpy"][name]["bytes_per_s"]
            print(f"{path:5} {name:>7}: {entry['bytes_per_s'] / 1e9:6.2f} GB/s = {entry['of_memcpy']:.0%} of memcpy",
                  flush=True)
    if "grpc" in report["paths"]:
        ceiling = in_child(context, counting_server, lambda address: grpcio_ceiling(address, sizes, args.repeats))
        report["grpcio_ceiling"] = ceiling
        for name, entry in ceiling.items():
            entry["of_memcpy"] = entry["bytes_per_s"] / report["memcpy"][name]["bytes_per_s"]
            entry["grpc_path_of_ceiling"] = report["paths"]["grpc"][name]["bytes_per_s"] / entry["bytes_per_s"]
            print(f"grpcio alone {name:>7}: {entry['bytes_per_s'] / 1e9:6.2f} GB/s = {entry['of_memcpy']:.0%} of memcpy; "
                  f"the grpc path moves {entry['grpc_path_of_ceiling']:.0%} of it", flush=True)
    memcpy_embeddings = memcpy([EMBEDDINGS[0] * EMBEDDINGS[1] * EMBEDDINGS[2] * 2], args.repeats)
    report["embeddings"] = in_child(context, prefill_side, lambda address, mailbox: push_embeddings(
        address, mailbox, args.repeats))
    for path, entry in report["embeddings"].items():
        entry["of_memcpy"] = entry["bytes_per_s"] / next(iter(memcpy_embeddings.values()))["bytes_per_s"]
        print(f"embeddings over {path:4}: {entry['bytes'] / 1e6:.1f} MB in {entry['seconds'] * 1e3:.1f} ms = "
              f"{entry['bytes_per_s'] / 1e9:.2f} GB/s = {entry['of_memcpy']:.0%} of memcpy", flush=True)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
