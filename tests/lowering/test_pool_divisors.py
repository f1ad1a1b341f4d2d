"""Average pools with ``divisor_override`` (TVM's importer drops it) become the average counting padding
times ``kernel volume / divisor`` before import (structfx/lowering/pool_divisors.py): numerics against
torch at odd sizes, with padding, strides, ceil_mode windows that fit, 3-d, batch 1 and a symbolic batch;
pools whose windows overhang or whose sizes are symbolic raise StructfxError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.errors import StructfxError


class Pool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x) + 1.0


POOLS = {
    "2x2": (lambda x: F.avg_pool2d(x, 2, divisor_override=3), (3, 6, 6)),
    "odd-padded-strided": (lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, divisor_override=7), (5, 7, 9)),
    "not-counting-padding": (lambda x: F.avg_pool2d(x, (3, 2), padding=1, count_include_pad=False,
                                                    divisor_override=2), (3, 5, 7)),
    "ceil-mode-windows-fit": (lambda x: F.avg_pool2d(x, 3, stride=2, ceil_mode=True, divisor_override=4),
                              (2, 7, 7)),
    "3d": (lambda x: F.avg_pool3d(x, 2, divisor_override=5), (2, 4, 5, 6)),
    "global-ceil-clipped": (lambda x: F.avg_pool2d(x, 64, ceil_mode=True, divisor_override=3), (3, 2, 2)),
}


@pytest.mark.parametrize("name", POOLS)
def test_divisor_override_matches_torch(name):
    pool, shape = POOLS[name]
    model = Pool(pool).eval()
    compiled = sfx.compile(model, torch.randn(3, *shape))
    for batch in (1, 2, 5):
        x = torch.randn(batch, *shape)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_overhanging_windows_are_refused():
    model = Pool(lambda x: F.avg_pool2d(x, 3, stride=2, ceil_mode=True, divisor_override=4)).eval()
    with pytest.raises(StructfxError, match=r"divisor_override=4.*ceil_mode.*past the padded input"):
        sfx.compile(model, torch.randn(1, 2, 6, 6))
