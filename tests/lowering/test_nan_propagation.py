"""NaN through compiled max and min (structfx/lowering/nan_propagation.py): every op torch builds on max
or min keeps a NaN where torch keeps it, and the values elsewhere are torch's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, tvm
from structfx.lowering.nan_propagation import propagate_nan

OPS = {
    "relu": torch.relu,
    "relu6": F.relu6,
    "clamp": lambda x: x.clamp(-1, 1),
    "clamp_min": lambda x: x.clamp(min=0.5),
    "hardtanh": F.hardtanh,
    "elu": F.elu,
    "maximum": lambda x: torch.maximum(x, x.flip(-1)),
    "minimum": lambda x: torch.minimum(x, x.flip(-1)),
    "amax": lambda x: x.amax(-1),
    "amin_keepdim": lambda x: x.amin(0, keepdim=True),
    "amax_all": lambda x: x.amax(),
    "max_dim_values": lambda x: x.max(-1).values,
    "min_dim_values": lambda x: x.min(1, keepdim=True).values,
    "max_pool1d": lambda x: F.max_pool1d(x[None], 2)[0],
    "max_pool2d": lambda x: F.max_pool2d(x[None, None], 2)[0, 0],
    "sparse_maxplus": sfx.nn.SparseMaxPlus(8, 5, k=2, generator=torch.Generator().manual_seed(0)),
}


class Op(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


@pytest.mark.parametrize("name", sorted(OPS))
def test_nan_where_torch_has_nan(name):
    model = Op(OPS[name]).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    x[1, 2] = x[3, 7] = float("nan")
    got, want = sfx.compile(model, x)(x), model(x)
    assert want.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=1e-6)


@pytest.mark.parametrize("name", ["max_dim", "min_dim"])
def test_max_and_min_over_a_dim_give_torch_indices(name):
    reduce = getattr(torch, name.split("_")[0])
    model = Op(lambda x: reduce(x, 1))
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    got, want = sfx.compile(model, x)(x), model(x)
    assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)


def _kernels():
    x = te.placeholder((16,), "float32", name="x")
    relu = te.compute((16,), lambda i: tirx.max(x[i], tirx.const(0.0, "float32")), name="relu")
    both = te.compute((16,), lambda i: tirx.min(x[i], x[15 - i]), name="both")
    computed = te.compute((16,), lambda i: tirx.max(x[i] * x[i], x[15 - i]), name="computed")
    index = te.compute((16,), lambda i: x[tirx.min(i + 1, 15)], name="index")
    return tvm.IRModule({"main": te.create_prim_func([x, relu, both, computed, index])})


def test_cpu_form_moves_constants_first_and_checks_the_first_operand():
    """LLVM's select(a > b, a, b) gives b when either is NaN: a constant goes first (free), else a is
    checked, bound once when computed; integer min (an index clamp) is left alone."""
    mod = _kernels()
    script = propagate_nan(mod, Target("llvm")).script()
    assert "relu[v_i] = T.max(T.float32(0.0), x[v_i])" in script
    assert "both[v_i] = T.Select(T.isnan(x[v_i]), x[v_i], T.min(x[v_i], x[15 - v_i]))" in script
    assert "T.Select(T.isnan(nan_operand), nan_operand, T.max(nan_operand, x[15 - v_i]))" in script
    assert "x[T.min(v_i + 1, 15)]" in script
    assert "T.isnan" not in mod.script()


def test_gpu_form_checks_every_computed_operand():
    script = propagate_nan(_kernels(), Target("cuda")).script()
    assert "relu[v_i] = T.Select(T.isnan(x[v_i]), x[v_i], T.max(x[v_i], T.float32(0.0)))" in script
    assert "T.Select(T.isnan(x[v_i]) or T.isnan(x[15 - v_i]), x[v_i] + x[15 - v_i]" in script


BF16_OPS = {
    "softmax": lambda x: torch.softmax(x, -1),
    "maximum": lambda x: torch.maximum(x, x.flip(-1)),
    "amax": lambda x: x.amax(-1),
    "max-pool1d": lambda x: F.max_pool1d(x, 2),
    "relu": torch.relu,
}


@pytest.mark.parametrize("name", BF16_OPS)
def test_bfloat16_ops_propagate_nan(name):
    class Op(nn.Module):
        def forward(self, x):
            return BF16_OPS[name](x)

    x = torch.randn(3, 4, 8).to(torch.bfloat16)
    x[0, 1, 2] = float("nan")
    compiled = sfx.compile(Op().eval(), x)
    torch.testing.assert_close(compiled(x), Op()(x), equal_nan=True, rtol=2e-2, atol=1e-2)
