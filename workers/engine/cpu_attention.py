"""Paged decode attention on CPU: a small C++ kernel, compiled on first use.

A decode step attends one query token per sequence over that sequence's blocks
of the pool. PyTorch alone would have to gather each sequence's blocks into a
contiguous tensor first (a copy of the whole context per layer per step, most
of a step's time); the kernel reads keys and values in place. A task is one
sequence and a run of its KV heads, so each token's keys and values are read as
one contiguous piece (streaming, converted to float once for every query head of
the GQA groups); a batch too small to keep every thread busy is split into more
runs of heads.
It is built with the machine's C++ compiler into torch's extension cache
(`scripts/setup.sh` builds it ahead of time); without a compiler the SDPA path
serves instead."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T>
static void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                          const int64_t* lengths, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
                          int64_t dim, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t token_stride = kv_heads * dim;  // one token's keys (all KV heads) in a block
  // A task is one sequence and a run of its KV heads, whose keys and values it reads as one
  // contiguous piece of each token row (streaming reads); sequences are split into as many runs
  // as it takes to give every thread work.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(kv_heads, std::max<int64_t>(1, (2 * threads + batch - 1) / batch));
  const int64_t per_chunk = (kv_heads + chunks - 1) / chunks;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query, scores, acc, row(per_chunk * dim), total;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, first = (task % chunks) * per_chunk;
      const int64_t count = std::min(per_chunk, kv_heads - first), rows = count * group, width = count * dim;
      const int64_t length = lengths[b];
      if (count <= 0) continue;
      const int64_t* table = tables + b * max_blocks;
      const T* q_rows = q + (b * heads + first * group) * dim;  // this run's query heads, in order
      query.resize(rows * dim);
      for (int64_t i = 0; i < rows * dim; ++i) query[i] = static_cast<float>(q_rows[i]) * scale;
      scores.assign(rows * length, 0.f);
      for (int64_t t = 0; t < length; ++t) {
        const T* keys = k_cache + (table[t / block_size] * block_size + t % block_size) * token_stride + first * dim;
        #pragma omp simd
        for (int64_t i = 0; i < width; ++i) row[i] = static_cast<float>(keys[i]);
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = query.data() + r * dim;
          const float* key = row.data() + (r / group) * dim;
          float dot = 0.f;
          #pragma omp simd reduction(+:dot)
          for (int64_t d = 0; d < dim; ++d) dot += qr[d] * key[d];
          scores[r * length + t] = dot;
        }
      }
      total.assign(rows, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores.data() + r * length;
        float top = -INFINITY;
        for (int64_t t = 0; t < length; ++t) top = std::max(top, s[t]);
        for (int64_t t = 0; t < length; ++t) { s[t] = std::exp(s[t] - top); total[r] += s[t]; }
      }
      acc.assign(rows * dim, 0.f);
      for (int64_t t = 0; t < length; ++t) {
        const T* values = v_cache + (table[t / block_size] * block_size + t % block_size) * token_stride + first * dim;
        #pragma omp simd
        for (int64_t i = 0; i < width; ++i) row[i] = static_cast<float>(values[i]);
        for (int64_t r = 0; r < rows; ++r) {
          const float p = scores[r * length + t];
          const float* value = row.data() + (r / group) * dim;
          float* a = acc.data() + r * dim;
          #pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * value[d];
        }
      }
      T* out_rows = out + (b * heads + first * group) * dim;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < dim; ++d) out_rows[r * dim + d] = static_cast<T>(acc[r * dim + d] / total[r]);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                           torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(tables.dtype() == torch::kInt64 && lengths.dtype() == torch::kInt64, "int64 tables and lengths");
  auto out = torch::empty_like(q);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                            batch, heads, kv_heads, dim, block_size, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

// Without the GIL: the worker's event loop (token streams, new requests) runs while a step attends.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, py::call_guard<py::gil_scoped_release>());
}
"""


@functools.cache
def kernel() -> Any:
    """The compiled extension module (built once per machine and source); None if it cannot be built."""
    try:
        from torch.utils import cpp_extension

        load_inline: Callable[..., Any] = cpp_extension.load_inline  # torch leaves it unannotated
        return load_inline(name="epd_paged_decode_cpu", cpp_sources=_SOURCE,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: the SDPA path still serves
        log.warning("the CPU paged-attention kernel could not be built (%s); decode attention uses SDPA", exc)
        return None


def paged_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """`[B, heads, dim]` outputs of one query per sequence over `[blocks, block_size, kv_heads, dim]`
    paged keys and values, with `[B, max_blocks]` block tables and `[B]` context lengths."""
    out: torch.Tensor = kernel().paged_decode(query.contiguous(), keys, values, tables, lengths, scale)
    return out
