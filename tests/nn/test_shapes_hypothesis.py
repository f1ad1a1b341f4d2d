"""Random shapes (hypothesis) for every layer: forward equals the reference, empty and odd sizes included.

Every draw, the torch seed included, comes from hypothesis, so a failing example replays and shrinks."""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from tests.cases import dense_reference

sizes = st.integers(1, 70)
batches = st.integers(0, 4)
SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**31 - 1)


@SETTINGS
@given(n_in=sizes, n_out=sizes, batch=batches, data=st.data(), seed=seeds)
def test_maxplus(n_in, n_out, batch, data, seed):
    torch.manual_seed(seed)
    k = data.draw(st.integers(1, n_in))
    layer = SparseMaxPlus(n_in, n_out, k, bias=data.draw(st.booleans())).double()
    x = torch.randn(batch, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.reference(x))


@SETTINGS
@given(n_in=sizes, n_out=sizes, batch=batches, variant=st.sampled_from(["orthogonal", "general"]),
       pairing=st.sampled_from(["butterfly", "random"]), seed=seeds)
def test_spm(n_in, n_out, batch, variant, pairing, seed):
    torch.manual_seed(seed)
    layer = SPMLinear(n_in, n_out, variant=variant, pairing=pairing).double()
    x = torch.randn(batch, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x))


@SETTINGS
@given(n_in=sizes, n_out=sizes, batch=batches, rank=st.integers(1, 4), seed=seeds)
def test_btt(n_in, n_out, batch, rank, seed):
    torch.manual_seed(seed)
    layer = BTTLinear(n_in, n_out, rank).double()
    x = torch.randn(batch, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x))


@SETTINGS
@given(size=st.integers(3, 12), kernel=st.integers(1, 3), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       ceil_mode=st.booleans(), data=st.data(), seed=seeds)
def test_pool(size, kernel, stride, dilation, ceil_mode, data, seed):
    torch.manual_seed(seed)
    padding = data.draw(st.integers(0, kernel // 2))
    assume(size + 2 * padding >= dilation * (kernel - 1) + 1)  # nn.MaxPool2d refuses a window that does not fit
    pool = MaxPlusPool2d(2, kernel, stride, padding, dilation, ceil_mode).double()
    torch.nn.init.normal_(pool.se)
    x = torch.randn(2, 2, size, size + 1, dtype=torch.float64)
    torch.testing.assert_close(pool(x), pool.reference(x))
