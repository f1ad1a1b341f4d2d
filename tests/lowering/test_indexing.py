"""Tensor indexing with an index tensor (``x[idx]``, ``x[:, idx]``, ``index_select``) compiles to clamped
reads with torch's negative indices (structfx/lowering/aten.py, ``convert_index``): values against torch
for in-range and negative indices at several batches; an index input out of range is refused at call time
(as torch raises IndexError), and a computed index out of range reads the nearest slice instead of memory
past the tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.errors import StructfxError


class Lookup(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("table", torch.randn(50, 7))

    def forward(self, idx, x):
        if self.how == "rows":
            picked = self.table[idx]
        elif self.how == "columns":
            picked = x[:, idx]
        else:
            picked = torch.index_select(self.table, 0, idx)
        return picked * 2.0


def _inputs(batch: int, low: int, high: int) -> tuple:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(low, high, (batch,), generator=generator), torch.randn(batch, 50, generator=generator)


@pytest.mark.parametrize("how", ["rows", "columns", "select"])
def test_index_tensor_matches_torch_with_negative_indices(how):
    model = Lookup(how).eval()
    compiled = sfx.compile(model, _inputs(3, 0, 50))
    for batch in (1, 3, 6):
        args = _inputs(batch, 0 if how == "select" else -50, 50)
        torch.testing.assert_close(compiled(*args), model(*args))


@pytest.mark.parametrize("how", ["rows", "select"])
def test_index_inputs_out_of_range_are_refused_at_call_time(how):
    compiled = sfx.compile(Lookup(how).eval(), _inputs(3, 0, 50))
    low = 0 if how == "select" else -50
    for bad in (50, low - 1, 10**8):
        with pytest.raises(StructfxError, match=f"holds {bad}, outside the tensor it indexes.*from {low} to 49"):
            compiled(torch.tensor([3, bad]), torch.randn(2, 50))


class Shifted(nn.Module):
    """An index the model computes, which the call-time check cannot see."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(50, 7))

    def forward(self, idx):
        return self.table[idx * 1000]


def test_computed_index_out_of_range_reads_the_nearest_row():
    model = Shifted().eval()
    compiled = sfx.compile(model, (torch.tensor([0, 0, 0]),))
    # 1000: the last row; -1000 wraps to -950, still below 0: the first
    torch.testing.assert_close(compiled(torch.tensor([0, 1, -1])), model.table[[0, 49, 0]])
