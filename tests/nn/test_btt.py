import math

import numpy as np
import pytest
import torch

from structfx import StructfxError
from structfx.nn import BTTLinear
from structfx.nn.btt import btt_factors


@pytest.mark.parametrize(
    "n, expected",
    [(1024, (32, 32, 1024)), (768, (24, 32, 768)), (257, (6, 43, 258)), (13, (1, 13, 13)), (4096, (64, 64, 4096))],
)
def test_factors_are_near_square_and_pad_primes(n, expected):
    assert btt_factors(n) == expected


@pytest.mark.parametrize("n", [2, 3, 97, 251, 509, 1021, 2 * 509])
def test_no_factor_below_quarter_root(n):
    small, large, padded = btt_factors(n)
    assert small * large == padded >= n and small >= math.sqrt(n) / 4


def _optimal_error(weight: np.ndarray, blocks, rank: int) -> float:
    """The best rank-r error of every m0 x n1 block, summed: computed block by block with numpy."""
    m0, m1, n0, n1 = blocks
    total = 0.0
    for i1 in range(m1):
        for j0 in range(n0):
            block = weight[j0 * n1:(j0 + 1) * n1, i1 * m0:(i1 + 1) * m0]
            singular = np.linalg.svd(block, compute_uv=False)
            total += float((singular[rank:] ** 2).sum())
    return math.sqrt(total)


@pytest.mark.parametrize("shape, rank", [((48, 36), 1), ((64, 64), 2), ((30, 20), 3)])
def test_svd_conversion_reaches_the_optimal_error(shape, rank):
    weight = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = BTTLinear.from_dense(weight, rank=rank)
    achieved = float((layer.to_dense() - weight).norm().detach())
    assert achieved == pytest.approx(_optimal_error(weight.numpy(), layer.blocks, rank), rel=1e-9)


def test_full_block_rank_is_exact_even_when_padded():
    weight = torch.randn(23, 17, dtype=torch.float64)
    bias = torch.randn(23, dtype=torch.float64)
    layer = BTTLinear.from_dense(weight, bias, rank=64)
    x = torch.randn(5, 17, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ weight.T + bias)


def test_square_layer_costs_two_r_n_to_the_1_5():
    layer = BTTLinear(1024, 1024, rank=2, bias=False)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 2 * 1024 * 32


def test_bad_rank_is_a_clear_error():
    with pytest.raises(StructfxError, match="rank=0"):
        BTTLinear(16, 16, rank=0)
