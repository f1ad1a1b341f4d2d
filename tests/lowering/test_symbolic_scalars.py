"""Arithmetic between a tensor and a symbolic size (structfx.lowering.symbolic_scalars): the size promoted
to the tensor's dtype as torch promotes it, at every size the symbolic batch takes."""

import pytest
import torch
from torch import nn

import structfx as sfx


class BySize(nn.Module):
    def forward(self, x):
        n = x.shape[0]
        return x / n, x * x.size(0), x + n, x - n, n - x, x.sum(0) / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tensor_with_the_symbolic_batch_as_a_scalar(dtype):
    model = BySize()
    compiled = sfx.compile(model, torch.randn(2, 5, dtype=dtype))
    for batch in (1, 3, 7):
        x = torch.randn(batch, 5, dtype=dtype)
        for got, want in zip(compiled(x), model(x)):
            torch.testing.assert_close(got, want)  # exact but for the sum's order
