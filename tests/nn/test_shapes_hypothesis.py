"""Random shapes (hypothesis) for every layer: forward equals the reference, empty and odd sizes included."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from tests.cases import dense_reference

sizes = st.integers(1, 70)
batches = st.integers(0, 4)
SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(n_in=sizes, n_out=sizes, batch=batches, data=st.data())
def test_maxplus(n_in, n_out, batch, data):
    k = data.draw(st.integers(1, n_in))
    layer = SparseMaxPlus(n_in, n_out, k, bias=data.draw(st.booleans())).double()
    x = torch.randn(batch, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.reference(x))


@SETTINGS
@given(n_in=sizes, n_out=sizes, batch=batches, variant=st.sampled_from(["orthogonal", "general"]),
       pairing=st.sampled_from(["butterfly", "random"]))
def test_spm(n_in, n_out, batch, variant, pairing):
    layer = SPMLinear(n_in, n_out, variant=variant, pairing=pairing).double()
    x = torch.randn(batch, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x))


@SETTINGS
@given(n_in=sizes, n_out=sizes, batch=batches, rank=st.integers(1, 4))
def test_btt(n_in, n_out, batch, rank):
    layer = BTTLinear(n_in, n_out, rank).double()
    x = torch.randn(batch, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x))


@SETTINGS
@given(size=st.integers(3, 12), kernel=st.integers(1, 3), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       ceil_mode=st.booleans(), data=st.data())
def test_pool(size, kernel, stride, dilation, ceil_mode, data):
    padding = data.draw(st.integers(0, kernel // 2))
    pool = MaxPlusPool2d(2, kernel, stride, padding, dilation, ceil_mode).double()
    torch.nn.init.normal_(pool.se)
    x = torch.randn(2, 2, size, size + 1, dtype=torch.float64)
    if min(x.shape[-2:]) + 2 * padding < dilation * (kernel - 1) + 1:
        return  # the window does not fit: nn.MaxPool2d refuses such input too
    torch.testing.assert_close(pool(x), pool.reference(x))
