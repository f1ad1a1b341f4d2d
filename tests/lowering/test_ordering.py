"""torch's order of floats in compiled argmax/argmin, max.dim/min.dim, sort, argsort and topk
(structfx/lowering/ordering.py): NaN above every number, the first NaN's index from argmax and argmin,
-0.0 tied with 0.0, stable sorts; every float dtype, the values bit for bit. torch's outputs are the answers."""

import pytest
import torch
from torch import nn

import structfx as sfx

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


class Ordered(nn.Module):
    """Every op of the family along dim 1 (and argmax over everything)."""

    def forward(self, x):
        largest, smallest = x.max(1), x.min(dim=1, keepdim=True)
        ascending, descending = torch.sort(x, 1), torch.sort(x, dim=1, descending=True, stable=True)
        return (x.argmax(1), x.argmin(dim=1, keepdim=True), x.argmax(), largest.values, largest.indices,
                smallest.values, smallest.indices, ascending.values, ascending.indices, descending.values,
                descending.indices, torch.argsort(x, 1, descending=True))


class TopK(nn.Module):
    def forward(self, x):
        return torch.topk(x, 4, 1), torch.topk(x, 3, dim=1, largest=False)


def _rows(rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows drawn from few values (ties), NaN, both infinities and both zeros."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.5, -1.5, 2.0, -3.0])
    picks = pool[torch.randint(len(pool), (rows, 9), generator=generator)]
    return picks.to(dtype)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    if want.dtype in BITS:
        return torch.equal(got.view(BITS[want.dtype]), want.view(BITS[want.dtype]))
    return torch.equal(got, want)


@pytest.mark.parametrize("dtype", list(BITS))
def test_argmax_argmin_max_min_sort_argsort_match_torch_bit_for_bit(dtype):
    model = Ordered().eval()
    compiled = sfx.compile(model, _rows(8, dtype, 0))
    for rows, seed in ((8, 1), (37, 2), (1, 3)):  # the batch is symbolic
        x = _rows(rows, dtype, seed)
        x[0, 3] = float("nan")  # a row with one NaN among numbers and -0.0 next to 0.0
        x[0, 5:7] = torch.tensor([-0.0, 0.0])
        got, want = compiled(x), model(x)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert _same_bits(g, w), f"output {i}: {g} != {w} for {x}"


@pytest.mark.parametrize("dtype", list(BITS))
def test_topk_returns_torchs_values_and_indices_of_them(dtype):
    """torch.topk does not order tied values' indices; the values must be torch's and the indices point at them."""
    model = TopK().eval()
    compiled = sfx.compile(model, _rows(8, dtype, 0))
    x = _rows(29, dtype, 4)
    for got, want in zip(compiled(x), model(x), strict=True):
        assert torch.equal(got.values.isnan(), want.values.isnan())
        assert torch.equal(got.values.nan_to_num(), want.values.nan_to_num())
        assert _same_bits(x.gather(1, got.indices), got.values)


def test_integer_sort_and_argmax_are_unchanged():
    model = Ordered().eval()
    x = torch.randint(-3, 3, (11, 9), generator=torch.Generator().manual_seed(5))
    got, want = sfx.compile(model, x)(x), model(x)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


class Median(nn.Module):
    def forward(self, x):
        return x.median(1), x.median(dim=-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_median_is_the_first_nan_of_a_row_with_one_and_the_lower_median_otherwise(dtype):
    """torch.median does not say which of tied medians' indices it returns: where a row has no NaN, the values
    must be torch's and the indices point at them; where it has one, the first NaN's index is torch's answer."""
    model = Median().eval()
    compiled = sfx.compile(model, _rows(8, dtype, 0))
    x = _rows(31, dtype, 6)
    has_nan = x.isnan().any(1)
    assert has_nan.any() and not has_nan.all()
    for got, want in zip(compiled(x), model(x), strict=True):
        values, indices = got.values.reshape(-1), got.indices.reshape(-1)
        assert torch.equal(values.isnan(), want.values.reshape(-1).isnan())
        assert torch.equal(values.nan_to_num(), want.values.reshape(-1).nan_to_num())
        assert torch.equal(indices[has_nan], want.indices.reshape(-1)[has_nan])
        assert _same_bits(x.gather(1, indices[:, None])[:, 0], values)
