"""Max and min reductions and max pooling start from -inf and +inf as torch's do
(structfx/lowering/reduction_identities.py): rows and windows of only -inf (+inf) give -inf (+inf), not the
finite extremes, in float32 and float64, at batch 1 and a symbolic batch; softmax and logsumexp, which
compute on their row max, keep torch's values on fully masked rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx

INF = float("inf")


def _attention(x, mask):
    """SDPA with a boolean mask whose row 0 masks every key (torch gives 0 there)."""
    return F.scaled_dot_product_attention(x, x, x, attn_mask=mask)


class Ops(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


OPS = {
    "amax": lambda x: x.amax(-1),
    "amin-keepdim": lambda x: x.amin(-1, keepdim=True),
    "amax-minus-x": lambda x: x.amax(-1, keepdim=True) - x,
    "max-pool1d": lambda x: F.max_pool1d(x, 3, stride=2),
    "max-pool1d-padded": lambda x: F.max_pool1d(x, 3, stride=2, padding=1),
    "max-pool2d-padded": lambda x: F.max_pool2d(x.unsqueeze(1), 3, stride=1, padding=1),
    "softmax": lambda x: torch.softmax(x, -1),
    "logsumexp": lambda x: torch.logsumexp(x, -1),
    "sdpa-fully-masked": lambda x: _attention(torch.nan_to_num(x, posinf=0.0, neginf=0.0).unsqueeze(1),
                                              x[..., :6].unsqueeze(1) > 0.5),
}


def _rows(batch: int, dtype) -> torch.Tensor:
    x = torch.randn(batch, 6, 9, dtype=dtype, generator=torch.Generator().manual_seed(batch))
    x[:, 0] = -INF
    x[:, 1] = INF
    x[:, 2, 3:6] = -INF
    x[:, 3, :2] = -INF
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", OPS)
def test_infinite_rows_and_windows_match_torch(name, dtype):
    model = Ops(OPS[name]).eval()
    compiled = sfx.compile(model, _rows(3, dtype))
    for batch in (1, 3, 4):
        x = _rows(batch, dtype)
        torch.testing.assert_close(compiled(x), model(x), equal_nan=True)
