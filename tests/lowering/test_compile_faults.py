"""compile() on what a first user tried: negative indices, slice assignment, scans of bools, dtypes,
models with buffers, broadcast inputs and bad calls. Each matches eager PyTorch or raises StructfxError."""

import pytest
import torch
from torch import nn

import structfx as sfx


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).double().norm() / want.double().norm().clamp_min(1e-12))


class Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class Lambda2(Lambda):
    def forward(self, x, y):
        return self.function(x, y)


def _slice_assign(x):
    h = x * 2
    h[:, :4] = 0
    h[:, -3:] = 1
    h[:, 6] = 5
    h[:, -2] = 4
    return h


def _assign_last_row(x):
    h = x * 2
    h[-1] = 3
    return h


#: (name, function of x (batch, 16), smallest batch it is defined at)
NEGATIVE_INDICES = [
    ("last_column", lambda x: x[:, -1], 1),
    ("second_last_column", lambda x: x[:, -2], 1),
    ("last_row", lambda x: x[-1], 1),
    ("second_last_row", lambda x: x[-2], 2),
    ("select_batch", lambda x: x.select(0, -1), 1),
    ("select_column", lambda x: x.select(1, -3), 1),
    ("slice_columns", lambda x: x[:, -5:-2], 1),
    ("slice_rows_from_end", lambda x: x[-1:], 1),
    ("slice_rows_to_end", lambda x: x[:-1], 1),
    ("narrow_columns", lambda x: x.narrow(1, -3, 2), 1),
    ("narrow_rows", lambda x: x.narrow(0, -1, 1), 1),
    ("last_of_3d", lambda x: x.reshape(x.shape[0], 4, 4)[:, -1, -1], 1),
    ("slice_assignment", _slice_assign, 1),
    ("assign_last_row", _assign_last_row, 1),
]


@pytest.mark.parametrize("function, smallest", [c[1:] for c in NEGATIVE_INDICES], ids=[c[0] for c in NEGATIVE_INDICES])
def test_negative_indices_match_eager_at_any_batch(function, smallest):
    model = Lambda(function)
    compiled = sfx.compile(model, torch.randn(4, 16))
    for batch in (1, 4, 7):
        if batch < smallest:
            continue
        x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
        want = model(x)
        got = compiled(x)
        assert got.shape == want.shape
        assert _relative(got, want) < 1e-5, f"batch {batch}"


def test_cumsum_of_a_bool_mask():
    model = Lambda2(lambda q, ids: q * (ids > 3).cumsum(-1).float()[..., None])
    q, ids = torch.randn(2, 8, 16), torch.randint(0, 8, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = sfx.compile(model, (q, ids))
    for batch in (1, 3):
        q, ids = torch.randn(batch, 8, 16), torch.randint(0, 8, (batch, 8))
        assert _relative(compiled(q, ids), model(q, ids)) < 1e-5
