"""A ReLU (in place or not) on a transposed Linear output: the max-plus that replaces it mixes the channels
wherever the transpose put them, in every spelling of a transpose, and never the batch: a 2-D ``h.t()``
puts the channels at dim 0, so that ReLU is kept (SparseMaxPlus over its last dim was as wide as the
example's batch and failed at any other)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.nn import ChannelMaxPlus, SparseMaxPlus
from tests.passes.field.harness import assert_computes_the_same, rows, transformed


class Transposed(nn.Module):
    def __init__(self, spelling, inplace: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.spelling, self.inplace = spelling, inplace

    def forward(self, x):
        h = self.fc(x)
        view = self.spelling(h)
        if self.inplace:
            torch.relu_(view)  # changes h through its transposed view
            return h
        return F.relu(view)


MATRIX = {  # (batch, 6) -> (6, batch): channels at dim 0
    "t()": lambda h: h.t(),
    "T": lambda h: h.T,
    "transpose(0, 1)": lambda h: h.transpose(0, 1),
    "torch.transpose": lambda h: torch.transpose(h, 0, 1),
    "swapaxes": lambda h: h.swapaxes(0, 1),
    "torch.t": lambda h: torch.t(h),
}
SEQUENCE = {  # (batch, T, 6) -> (batch, 6, T): channels at dim 1
    "mT": lambda h: h.mT,
    "transpose(-1, -2)": lambda h: h.transpose(-1, -2),
    "torch.swapdims": lambda h: torch.swapdims(h, 1, 2),
}


@pytest.mark.parametrize("inplace", [True, False], ids=["relu_", "relu"])
@pytest.mark.parametrize("spelling", list(MATRIX))
def test_a_relu_on_a_transposed_matrix_is_kept(spelling, inplace):
    torch.manual_seed(0)
    model = Transposed(MATRIX[spelling], inplace).eval()
    inputs = [(torch.randn(3, 6),), (torch.randn(5, 6),)]
    small = transformed(model, inputs, rules=[sfx.MaxPlus(k=2, min_features=1)])
    assert not any(isinstance(m, SparseMaxPlus) for m in small.modules())
    assert any("channels at dim 0" in row.reason for row in rows(small).values())
    assert_computes_the_same(small, model, inputs, tolerance=0)


@pytest.mark.parametrize("inplace", [True, False], ids=["relu_", "relu"])
@pytest.mark.parametrize("spelling", list(SEQUENCE))
def test_a_relu_on_a_transposed_sequence_mixes_the_channels(spelling, inplace):
    torch.manual_seed(0)
    model = Transposed(SEQUENCE[spelling], inplace).eval()
    inputs = [(torch.randn(2, 3, 6),), (torch.randn(4, 5, 6),)]
    small = transformed(model, inputs, rules=[sfx.MaxPlus(k=2, min_features=1)])
    layers = [m for m in small.modules() if isinstance(m, SparseMaxPlus)]
    assert len(layers) == 1 and isinstance(layers[0], ChannelMaxPlus) and layers[0].in_features == 6
    assert_computes_the_same(small, model, inputs, tolerance=0)
