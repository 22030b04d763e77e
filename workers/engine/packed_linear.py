"""Linear layers with their weights laid out once for oneDNN, on CPU in bfloat16.

`F.linear` hands oneDNN a plain `[out, in]` weight on every call, and oneDNN
reorders it into its blocked layout (AMX / AVX-512 tiles) each time. Reordered
once at load, as torch.compile's CPU weight freezing does, the same matmuls ran
1.3-1.45x faster in prefill and decode here (small-llava, bfloat16, 2 cores).
Eager float32 weights stay plain: they go to MKL, and the tests pin float32
outputs token for token against `generate`; compiled float32 layers
(`--compile-float32`) pack theirs (1.2-2x faster matmuls at 8-64 rows here, on
AVX2 without native bfloat16).

The matmul is a custom op, so compiled layers (TorchInductor) call it as it is:
Inductor's own oneDNN lowering takes only weights frozen into the graph, which
would give each decoder layer a graph of its own. It is defined through
`torch.library.Library`, with one kernel for every backend, not through
`custom_op`: the latter's Python wrappers (autograd, aliasing checks) cost 8 us
of each call here, 32 calls per decode step of small-llava."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 64  # the row count oneDNN tunes the layout for; the layout serves any row count


_library: Callable[..., Any] = torch.library.Library  # torch leaves it unannotated
_LIBRARY = _library("epd", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor rows, Tensor packed, Tensor? bias, int out_features) -> Tensor")


def _packed_linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """`[rows, in] @ weight.T + bias` with the weight in oneDNN's layout."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out


# every backend: the packed weight is an MkldnnCPU tensor, the rows a plain CPU one; no autograd (inference)
_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
packed_linear = torch.ops.epd.packed_linear.default


def _packed_linear_shape(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                         out_features: int) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], out_features))


_register_fake: Callable[..., Any] = torch.library.register_fake
_register_fake("epd::packed_linear", _packed_linear_shape)


class PackedLinear(nn.Module):
    """`nn.Linear` over a `[out, in]` weight laid out in oneDNN's layout (the plain weight is not kept: no
    second copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # buffers, so one compiled graph serves every layer (Inductor takes them as inputs)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = packed_linear(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)


def onednn() -> bool:
    """Whether this torch has oneDNN (and its weight reordering)."""
    return bool(torch._C._has_mkldnn) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX-512 BF16 or AMX); elsewhere (AVX2) oneDNN
    refuses them and torch emulates them, several times slower than float32."""
    return onednn() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs(dtype: torch.dtype, device: torch.device, compiled: bool = False) -> bool:
    """Whether linear layers of this dtype on this device get packed weights: bfloat16 where the CPU
    computes it natively, float32 in compiled layers only (eager float32 stays on MKL, exact against
    `generate`)."""
    if device.type != "cpu" or not onednn():
        return False
    return compiled if dtype == torch.float32 else dtype == torch.bfloat16 and native_bfloat16()


def pack_linears(root: nn.Module) -> int:
    """Replace every bfloat16 CPU `nn.Linear` below `root` by a `PackedLinear`; returns how many. A layer
    oneDNN refuses stays as it was."""
    packed = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and packs(child.weight.dtype, child.weight.device):
                try:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
                except RuntimeError as exc:
                    log.warning("keeping %s plain: oneDNN cannot pack it (%s)", name, exc)
                    continue
                packed += 1
    return packed
