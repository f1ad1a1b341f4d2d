"""Our kernels on inputs whose row count is an expression, not a plain batch var: rows = batch*k
(a layer on (B, k, n) or (B, H, W, C)), rows after a transpose, a batch folded with another dim.
TVM could not schedule the BTT kernel on rows s*16 ("not a stage pipeline" in reverse_compute_at)."""

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, ChannelMaxPlus, MaxPlusPool2d, SparseMaxPlus, SPMLinear

BATCHES = (1, 2, 3, 7)


class Transposed(nn.Module):
    """layer(x.transpose(1, 2)): x (B, n, L) -> rows B*L."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.transpose(1, 2))


class Folded(nn.Module):
    """layer on x (B, k, *rest) with B and k folded into one dim: a 2-D (B*k, n) input, or (B*k, C, H, W)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.flatten(0, 1))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def _layers(n: int):
    return {
        "btt": lambda: BTTLinear(n, n, rank=4),
        "spm": lambda: SPMLinear(n, n),
        "maxplus": lambda: SparseMaxPlus(n, n, k=3),
    }


CASES = {
    # name: (module, input shape at batch B as a function of B)
    **{f"{op}_rows_batch_x_k": (lambda make=make: make(), lambda b: (b, 5, 64)) for op, make in _layers(64).items()},
    **{f"{op}_bhwc": (lambda make=make: make(), lambda b: (b, 4, 4, 64)) for op, make in _layers(64).items()},
    **{f"{op}_transposed": (lambda make=make: Transposed(make()), lambda b: (b, 16, 10))
       for op, make in _layers(16).items()},
    **{f"{op}_folded_2d": (lambda make=make: Folded(make()), lambda b: (b, 3, 16)) for op, make in _layers(16).items()},
    "channel_maxplus_nchw": (lambda: ChannelMaxPlus(8, 8, k=2), lambda b: (b, 8, 3, 5)),
    "maxplus_pool_folded": (lambda: Folded(MaxPlusPool2d(2, 3, 2, 1)), lambda b: (b, 3, 2, 7, 8)),
    "maxplus_pool_batch": (lambda: MaxPlusPool2d(2, 3, 2, 1), lambda b: (b, 2, 7, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compound_rows_match_eager_at_any_batch(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    compiled = sfx.compile(module, torch.randn(shape(2)))
    for batch in BATCHES:
        x = torch.randn(shape(batch))
        with torch.no_grad():
            want = module(x)
        got = compiled(x)
        assert got.shape == want.shape
        assert _relative(got, want) < 1e-5, batch


def test_transformed_linear_on_transposed_input():
    """The issue's repro: BTT replacing a Linear applied after a transpose."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x.transpose(1, 2))

    x = torch.randn(2, 16, 10)
    small = sfx.transform(Model().eval(), [sfx.BTT(rank=2, min_features=8)], example_inputs=(x,)).eval()
    compiled = sfx.compile(small, (x,))
    for batch in BATCHES:
        x = torch.randn(batch, 16, 10)
        with torch.no_grad():
            want = small(x)
        assert _relative(compiled(x), want) < 1e-5, batch


def test_transformed_linear_on_feature_map():
    """A Linear on a (B, H, W, C) feature map (ConvNeXt's pointwise MLP) replaced by BTT: rows B*16."""
    x = torch.randn(2, 4, 4, 64)
    small = sfx.transform(nn.Sequential(nn.Linear(64, 64)).eval(), [sfx.BTT(rank=2)], example_inputs=(x,)).eval()
    compiled = sfx.compile(small, (x,))
    for batch in BATCHES:
        x = torch.randn(batch, 4, 4, 64)
        with torch.no_grad():
            want = small(x)
        assert _relative(compiled(x), want) < 1e-5, batch
