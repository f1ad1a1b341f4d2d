"""Fast-math legalizations (structfx/lowering/fast_math.py): every op they replace matches torch in float32 at odd
sizes and any batch, and the kernels they give call no scalar libm function."""

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Target, relax, tirx
from structfx.lowering.fast_math import FAST, POWERS, fast_math_legalizations

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})

ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": lambda x: torch.exp(x.clamp(max=80.0)),  # libm's exp (fast_math.py keeps it): checked for range too
    "erf": torch.erf,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


class Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name](x)


def _inputs(batch: int, width: int) -> torch.Tensor:
    """Wide values (std 6) with the edges of the approximations in the first row: 0, tiny, large, infinities."""
    x = torch.randn(batch, 5, width, generator=torch.Generator().manual_seed(batch)) * 6
    edges = torch.tensor([0.0, 1e-30, -1e-8, 30.0, -30.0, 100.0, -100.0, 5.9, -5.9, 4.0])
    x[0, 0, : min(width, len(edges))] = edges[:width]
    return x


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_torch_at_odd_width_and_any_batch(name):
    model = Activation(name).eval()
    compiled = sfx.compile(model, _inputs(3, 37))
    for batch in (1, 7):
        x = _inputs(batch, 37)
        got, want = compiled(x), model(x.double())
        assert torch.isfinite(got).all()
        assert float(((got.double() - want).abs() / want.abs().clamp_min(1.0)).max()) < 1e-6


class MaskedSoftmax(nn.Module):
    """Attention's softmax over scores whose last 4 keys are masked with -inf."""

    def __init__(self, keys: int) -> None:
        super().__init__()
        mask = torch.zeros(keys)
        mask[keys - 4:] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x):
        return torch.softmax(x + self.mask, dim=-1)


def test_softmax_of_masked_scores_is_exactly_zero_where_masked():
    model = MaskedSoftmax(9).eval()
    x = torch.randn(3, 4, 9)
    got = sfx.compile(model, x)(x)
    assert (got[..., 5:] == 0).all()
    assert torch.allclose(got, model(x), atol=1e-6)


def _legalized(op, dtype: str):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), 33], dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    with AVX2:
        return relax.transform.LegalizeOps(fast_math_legalizations())(bb.get())


#: The torch activation each Relax op comes from (each is checked against torch above).
ACTIVATIONS_OF = {
    "relax.erf": "erf", "relax.tanh": "tanh", "relax.sigmoid": "sigmoid", "relax.nn.silu": "silu",
    "relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh", "relax.nn.softmax": "softmax",
}
OPS = {
    "relax.erf": relax.op.erf, "relax.tanh": relax.op.tanh,
    "relax.sigmoid": relax.op.sigmoid, "relax.nn.silu": relax.op.nn.silu, "relax.nn.gelu": relax.op.nn.gelu,
    "relax.nn.gelu_tanh": relax.op.nn.gelu_tanh, "relax.nn.softmax": relax.op.nn.softmax,
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_float32_kernels_call_no_libm_function(name):
    assert set(OPS) == set(FAST) == set(ACTIVATIONS_OF)
    script = _legalized(OPS[name], "float32").script()
    for intrinsic in ("T.exp(", "T.erf(", "T.tanh(", "T.sigmoid("):
        assert intrinsic not in script


def test_other_dtypes_keep_tvm_legalization():
    script = _legalized(relax.op.exp, "float64").script()
    assert "T.exp(" in script


@pytest.mark.parametrize("name", sorted(set(ACTIVATIONS) - {"exp"}))  # bare exp below (no clamp)
def test_nan_stays_nan(name):
    model = Activation(name).eval()
    x = _inputs(2, 11)
    x[1, 2, 3] = float("nan")
    got, want = sfx.compile(model, x)(x), model(x)
    assert torch.equal(got.isnan(), want.isnan())


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_bare_exp_keeps_float32_range():
    """exp near float32's overflow (88.72) and underflow (results below 1e-38 are subnormal, not zero)."""
    x = torch.tensor([[88.3, 88.5, 88.7, -88.0, -95.0, -103.0, 0.5, float("nan")]])
    got, want = sfx.compile(Exp().eval(), x)(x), torch.exp(x)
    assert torch.isfinite(got[:, :-1]).all() and (got[:, :-1] > 0).all() and got[0, -1].isnan()
    assert torch.allclose(got[:, :-1], want[:, :-1], rtol=1e-6, atol=0)


class Powers(nn.Module):
    """Every constant exponent fast_math.POWERS computes without pow, and one it leaves to TVM (2.5)."""

    def forward(self, x):
        return x.pow(3), x**2, torch.pow(x, -1), x.pow(-2.0), x.pow(2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_powers_match_torch_bit_for_bit(dtype):
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(0), dtype=dtype) * 4
    x[0, :6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-30])
    compiled = sfx.compile(Powers().eval(), x)
    *exact, other = compiled(x)
    *want_exact, want_other = Powers()(x)
    for got, want in zip(exact, want_exact):
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(other, want_other, rtol=1e-6, equal_nan=True)


def test_constant_powers_call_no_pow():
    assert set(POWERS) == {2.0, 3.0, -1.0, -2.0, 0.5, -0.5}
    for exponent in POWERS:
        script = _legalized(lambda x, e=exponent: relax.op.power(x, relax.const(e, "float32")), "float32").script()
        assert "T.pow(" not in script
    script = _legalized(lambda x: relax.op.power(x, relax.const(2.5, "float32")), "float32").script()
    assert "T.pow(" in script


class Roots(nn.Module):
    def forward(self, x):
        return x**0.5, x.pow(-0.5)


SPECIAL = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), -1.0, 1e-30, 4.0]


def _same(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Equal as torch returns it: NaN where torch has NaN, the same value and the same sign of zero elsewhere."""
    return (got.isnan() & want.isnan()) | ((got == want) & (got.signbit() == want.signbit()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_square_roots_match_torch_at_special_values_and_reciprocal_root_bit_for_bit(dtype):
    """torch's float32/float64 kernel computes x ** 0.5 as sqrt (so (-0.0) ** 0.5 is -0.0 and (-inf) ** 0.5 NaN,
    where pow gives 0.0 and inf) and x ** -0.5 as 1 / sqrt; in float16 it calls pow. Its sqrt is not correctly
    rounded (MKL's vectorised one: one ulp off for ~17% of random float32), ours is: those agree within an ulp."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 2000, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(
        -20, 20, (4, 2000), generator=generator)).to(dtype)
    x[0, : len(SPECIAL)] = torch.tensor(SPECIAL, dtype=dtype)
    (root, reciprocal), (want_root, want_reciprocal) = sfx.compile(Roots().eval(), x)(x), Roots()(x)
    assert _same(reciprocal, want_reciprocal).all()
    assert _same(root[0, : len(SPECIAL)], want_root[0, : len(SPECIAL)]).all()
    finite = want_root.isfinite()
    assert _same(root[~finite], want_root[~finite]).all()
    assert ((root - want_root).abs()[finite] <= torch.finfo(dtype).eps * want_root.abs()[finite]).all()
