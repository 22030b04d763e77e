"""What one worker process's engines share: the paged KV pool (allocated once,
sized in bytes or as a fraction of free GPU memory), its block allocator (the
prefix cache) and the packed decoder with the attention backend chosen at start."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..models import LanguagePartBase
from .attention import select_backend
from .block_allocator import BlockAllocator
from .compiled import compiles
from .forward import PackedDecoder, kv_layout
from .kv_pool import Allocator, KVPool
from .packed_linear import pack_linears
from .step_threads import StepThreads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheConfig:
    """`capacity_bytes` 0 means: on CUDA, `gpu_memory_utilization` of the device less what is in use;
    on CPU, 1 GiB. `prefix_cache_bytes` bounds the free blocks kept as prefix cache (0: off)."""

    capacity_bytes: int = 0
    block_size: int = 16
    prefix_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.capacity_bytes < 0 or self.prefix_cache_bytes < 0:
            raise ValueError("KV cache sizes must be >= 0 bytes")
        if self.block_size <= 0:
            raise ValueError(f"KV block size must be > 0, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class EngineRuntime:
    decoder: PackedDecoder
    allocator: BlockAllocator

    @property
    def pool(self) -> KVPool:
        return self.decoder.pool


def pool_bytes(config: KVCacheConfig, device: torch.device) -> int:
    if config.capacity_bytes:
        return config.capacity_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free - total * (1 - config.gpu_memory_utilization))
    return 1 << 30


def build_runtime(language: LanguagePartBase, config: KVCacheConfig, allocate: Allocator | None = None,
                  enforce_eager: bool = False, threads: StepThreads | None = None,
                  compile_float32: bool = False) -> EngineRuntime:
    """The runtime of a language part; `allocate` places the pool (e.g. in shared memory). The layers'
    dense parts are compiled where `compiles` says so (and compiled here, before any request)."""
    layout = kv_layout(language, config.block_size)
    pool = KVPool.sized(layout, pool_bytes(config, language.device), language.device, allocate)
    allocator = BlockAllocator(pool.num_blocks, config.prefix_cache_bytes // layout.bytes_per_block)
    attention = select_backend(pool, layout.head_dim ** -0.5, config.attention)
    compiled = compiles(language.dtype, language.device, enforce_eager, compile_float32)
    packed = 0 if compiled else pack_linears(language.text_model)  # Inductor lays the weights out itself
    if packed:
        log.info("%d linear layers run on weights laid out once for oneDNN", packed)
    log.info("KV pool: %d blocks of %d tokens (%.1f MiB, %d KiB per token) on %s", pool.num_blocks,
             layout.block_size, pool.nbytes / 2**20, layout.bytes_per_token // 1024, pool.device)
    decoder = PackedDecoder(language, pool, attention, compiled, threads)
    decoder.warm_up()
    return EngineRuntime(decoder, allocator)
