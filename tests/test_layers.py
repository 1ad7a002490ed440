"""Layer-level fast paths equal their plain twins."""

import torch

from dsv3.layers import Linear, column_major_


def test_column_major_linear_is_the_same_function():
    torch.manual_seed(0)
    lin = Linear(48, 300, dtype=torch.float32)
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(3, 5, 48)
    before = lin(x)
    w = lin.weight.detach().clone()
    column_major_(lin)
    assert lin.weight.stride() == (1, 300)  # Wᵀ contiguous
    assert torch.equal(lin.weight, w)  # same values, same shape
    torch.testing.assert_close(lin(x), before, rtol=1e-6, atol=1e-6)
    assert lin.state_dict()["weight"].shape == (300, 48)
