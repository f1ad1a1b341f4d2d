"""Kind 7: float64, bfloat16 and float16 models. Replacements are built in the model's dtype (fitted in
float32, or float64, and cast); the structured ops run forward, fake and backward in each; a dtype they do
not support is a StructfxError naming it."""

import copy

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, ChannelMaxPlus, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from structfx.passes.rules.placement import SUPPORTED_DTYPES
from tests.passes.field.field_b import MLP, ConvPool, relative, transformed

DTYPES = [torch.float64, torch.bfloat16, torch.float16]


def _mlp(dtype):
    torch.manual_seed(0)
    return MLP().to(dtype), (torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(dtype),)


def _rounding(model, x) -> float:
    """How far the model in its low precision is from itself in float64: the scale of any error there."""
    return relative(model(x), copy.deepcopy(model).double()(x.double()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_rules_keep_the_function_in_every_dtype(dtype):
    model, (x,) = _mlp(dtype)
    result = transformed(model, [sfx.BTT(rank=64), sfx.MaxPlus(k=2)], (x,))
    assert {type(m) for m in result.modules()} >= {BTTLinear, SparseMaxPlus}
    assert all(p.dtype == dtype for p in result.parameters())
    with torch.no_grad():
        got, want = result(x), model(x)
        assert got.dtype == dtype
        if dtype == torch.float64:
            assert relative(got, want) < 1e-5
        else:  # BTT sums in another order: within a few roundings of the dtype
            assert relative(got, want) < 4 * _rounding(model, x)
    report = sfx.report(result)
    assert report.model_error is not None and all(row.error is not None for row in report.replaced)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_rules_are_bitwise_exact_in_every_dtype(dtype):
    torch.manual_seed(0)
    model = ConvPool().to(dtype)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    result = transformed(model, [sfx.MaxPlus(k=2, min_features=1), sfx.MaxPlusPool(min_features=1)], (x,))
    assert sum(isinstance(m, (ChannelMaxPlus, MaxPlusPool2d)) for m in result.modules()) >= 2
    with torch.no_grad():
        assert torch.equal(result(x), model(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spm_fits_in_float32_and_runs_in_the_model_dtype(dtype):
    model, (x,) = _mlp(dtype)
    result = transformed(model, sfx.SPM(fit_steps=60, progress=False), (x,))
    layers = [m for m in result.modules() if isinstance(m, SPMLinear)]
    assert len(layers) == 2 and all(p.dtype == dtype for m in layers for p in m.parameters())
    with torch.no_grad():
        out = result(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert 0 < sfx.report(result).model_error < 1.5


def test_an_unsupported_dtype_is_named():
    model = nn.Sequential(nn.Linear(64, 64, dtype=torch.complex64))
    x = torch.randn(4, 64, dtype=torch.complex64)
    message = r"module '0' \(Linear\) computes in complex64, which structfx layers do not support"
    with pytest.raises(sfx.StructfxError, match=message):
        transformed(model, sfx.BTT(rank=4), (x,))


def _op_cases(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).to(dtype).requires_grad_()
    btt = BTTLinear(16, 12, rank=2, generator=g).to(dtype)
    spm = SPMLinear(16, 12, generator=g).to(dtype)
    maxplus = SparseMaxPlus(16, 8, k=3, generator=g).to(dtype)
    pool = MaxPlusPool2d(2, 2).to(dtype)
    image = torch.randn(1, 2, 6, 6, generator=g).to(dtype).requires_grad_()
    return [
        (torch.ops.structfx.btt.default, (x, btt.w1, btt.w2, btt.bias, 12)),
        (torch.ops.structfx.spm.default,
         (x, spm.d_in, spm.coeffs, spm.d_out, spm.bias, "orthogonal", "butterfly", 0, 12)),
        (torch.ops.structfx.sparse_maxplus.default, (x, maxplus.idx, maxplus.weight, maxplus.bias)),
        (torch.ops.structfx.maxplus_pool2d.default, (image, pool.se, [2, 2], [0, 0], [1, 1], False)),
    ]


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_custom_ops_run_forward_fake_and_backward_in_each_supported_dtype(dtype):
    for op, args in _op_cases(dtype):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        out = op(*args)
        assert out.dtype == dtype
        out.float().sum().backward()
        grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        assert all(g is not None and g.dtype == dtype for g in grads)
