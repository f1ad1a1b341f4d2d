import itertools

import pytest
import torch
from torch import nn

from structfx import StructfxError
from structfx.nn import MaxPlusPool2d

GEOMETRIES = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=c)
    for k, s, p, d, c in itertools.product([2, 3, (2, 3)], [1, 2, (2, 1)], [0, 1], [1, 2], [False, True])
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_zero_structuring_element_is_max_pool(geometry):
    x = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(0))
    pool = nn.MaxPool2d(**geometry)
    ours = MaxPlusPool2d.from_module(pool, channels=3)
    assert torch.equal(ours(x), pool(x))


def test_unbatched_input():
    pool = MaxPlusPool2d(4, 2)
    x = torch.randn(4, 6, 6)
    assert torch.equal(pool(x), nn.MaxPool2d(2)(x))


def test_global_pool_uses_a_per_position_element():
    x = torch.randn(2, 5, 7, 7)
    ours = MaxPlusPool2d.from_module(nn.AdaptiveAvgPool2d(1), channels=5, input_size=(7, 7))
    assert ours.se.shape == (5, 7, 7)
    assert torch.equal(ours(x), nn.AdaptiveMaxPool2d(1)(x))


def test_avg_pool_geometry_is_kept():
    ours = MaxPlusPool2d.from_module(nn.AvgPool2d(3, 2, 1), channels=2)
    assert (ours.kernel_size, ours.stride, ours.padding) == ((3, 3), (2, 2), (1, 1))


def test_bad_input_and_geometry_are_clear_errors():
    with pytest.raises(StructfxError, match=r"expects \(N, 3, H, W\)"):
        MaxPlusPool2d(3, 2)(torch.randn(1, 4, 6, 6))
    with pytest.raises(StructfxError, match="at most half the kernel"):
        MaxPlusPool2d(3, 2, padding=2)
    with pytest.raises(StructfxError, match="does not divide"):
        MaxPlusPool2d.from_module(nn.AdaptiveMaxPool2d(3), channels=1, input_size=(7, 7))
