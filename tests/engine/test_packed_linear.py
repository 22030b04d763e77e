"""Linear layers on weights laid out once for oneDNN (bfloat16 on CPU) compute
what `nn.Linear` computes; float32 layers are left alone (the exactness tests
pin them to `generate`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epd.workers.engine.packed_linear import PackedLinear, pack_linears, packs

pytestmark = pytest.mark.skipif(not packs(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU build of torch has no oneDNN bfloat16 (nothing is packed)")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (37, 96), (3, 5, 96)])
def test_a_packed_linear_computes_what_the_linear_does(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    expected = linear(x)
    got = PackedLinear(linear.weight, linear.bias)(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_only_bfloat16_cpu_linears_are_packed():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    plain = nn.Sequential(nn.Linear(8, 8))
    assert pack_linears(model.to(torch.bfloat16)) == 3 and pack_linears(plain) == 0  # float32 stays plain
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][2], PackedLinear)
    assert type(plain[0]) is nn.Linear
    assert model(torch.ones(2, 8, dtype=torch.bfloat16)).shape == (2, 8)
