"""Differential sweep: compiled elementwise, reduction, ordering and pooling ops against eager torch on special
values (+-0.0, +-inf, NaN, subnormals, large and small magnitudes; integers for integer ops), in float32, float64
and bfloat16 (and int64 for integer ops). torch's outputs are the answers.

Exactness: bit for bit (sign of zero included; every NaN is equal to every NaN, at the same positions) for
results torch defines exactly: rounding, sign, comparisons, min/max, selection, +-*/, floor division and
remainder, powers by 2, 3, -1, 0.5 (ATen's products and sqrt), ordering ops. ``ulps`` allows that many units in
the last place where the math library legitimately differs (TVM's vectorisable exp/erf/tanh polynomials or
libm against torch's Sleef; summation order in reductions): the sign and the infinities must still be torch's.

Each group of ops is one module, compiled once per dtype (``_compiled``, cached) and called on one input;
each op is its own test reading its output. Known divergences not fixed yet are strict xfails naming them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx

INF, NAN = math.inf, math.nan
FLOATS = (torch.float32, torch.float64, torch.bfloat16)
INTEGERS = (torch.int64,)  # int32 takes the same converters; one integer dtype keeps the suite fast
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


@dataclass(frozen=True)
class Case:
    """An op of a group: ``op(*inputs)`` gives a tensor or a tuple of them; ``ulps`` as the module docstring;
    ``defined(*inputs)``: the positions (of the output) where torch's answer does not depend on its vector width
    (None: everywhere); ``known``: dtype -> why it still diverges (a strict xfail); ``index_ties``: the outputs
    at these positions are indices torch's quickselect picks among ties: checked to point at an element equal
    (in torch's order) to the returned value instead."""

    op: object
    ulps: int = 0
    defined: object = None
    known: dict = field(default_factory=dict)
    index_ties: tuple = ()


def _subnormal(dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps * 3


def _specials(dtype) -> torch.Tensor:
    big = {torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e300}[dtype]
    tiny = _subnormal(dtype)
    values = [0.0, -0.0, INF, -INF, NAN, tiny, -tiny, 1.0, -1.5, 2.5, -2.5, 0.5, 3.0, -7.0, big, -big]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _rows(dtype) -> torch.Tensor:
    """Rows of 4 for reductions and pools: zeros of both signs, infinities, NaN, ties, subnormals."""
    tiny = _subnormal(dtype)
    rows = [[-0.0, 0.0, -0.0, -0.0], [0.0, -0.0, 0.0, 0.0], [-0.0] * 4, [-INF] * 4, [INF] * 4, [INF, -INF, 1, 2],
            [NAN, 1, 2, 3], [1, NAN, INF, -INF], [tiny, -tiny, 0.0, -0.0], [1e4, 1e4, -1e4, 3], [1, 2, 2, 1],
            [3, 1, 2, -5], [NAN, NAN, 1, 0], [-1, -0.0, NAN, 0.0], [2, 1, 2, 1], [-INF, NAN, -INF, 5]]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


def _grid(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of ``values``: (a, b) flattened."""
    return values.repeat_interleave(len(values)), values.repeat(len(values))


def _normal_divisor(a, b):
    """torch's vectorised fmod (Sleef) gives NaN for a subnormal divisor where its scalar loop gives C's
    fmod: the answer depends on the tensor's length, so those pairs are not compared."""
    return (b == 0) | (b.abs() >= torch.finfo(b.dtype).tiny) | ~b.isfinite()



UNARY = {
    "neg": Case(torch.neg), "abs": Case(torch.abs), "relu": Case(torch.relu), "floor": Case(torch.floor),
    "ceil": Case(torch.ceil), "round": Case(torch.round), "trunc": Case(torch.trunc), "sign": Case(torch.sign),
    "frac": Case(torch.frac), "reciprocal": Case(torch.reciprocal), "square": Case(torch.square),
    "pow2": Case(lambda x: x ** 2), "pow3": Case(lambda x: x ** 3), "pow_half": Case(lambda x: x ** 0.5),
    "pow_minus1": Case(lambda x: x ** -1), "pow_1.5": Case(lambda x: x ** 1.5, ulps=1),
    "sqrt": Case(torch.sqrt), "rsqrt": Case(torch.rsqrt, ulps=1),
    "clamp": Case(lambda x: x.clamp(-1, 1)), "hardtanh": Case(F.hardtanh), "relu6": Case(F.relu6),
    "leaky_relu": Case(F.leaky_relu), "hardswish": Case(F.hardswish, ulps=1), "hardsigmoid": Case(F.hardsigmoid),
    "hardshrink": Case(F.hardshrink), "threshold": Case(lambda x: F.threshold(x, 0.5, -2.0)),
    "isnan": Case(torch.isnan), "isinf": Case(torch.isinf),
    "isfinite": Case(torch.isfinite, known={dtype: "torch.export writes isfinite(x) as (x == x) * (abs(x) != inf) "
                                                   "and TVM's simplifier folds x == x to true" for dtype in FLOATS}),
    "nan_to_num": Case(torch.nan_to_num, known={torch.bfloat16: "TVM has no bfloat16 isnan"}),
    "mul_scalar": Case(lambda x: x * 0.5), "add_scalar": Case(lambda x: x + 1.0), "div_scalar": Case(lambda x: x / 3.0),
    "rsub_scalar": Case(lambda x: 1.0 - x),
    "floor_divide_scalar": Case(lambda x: torch.floor_divide(x, 1.5)), "floordiv_op": Case(lambda x: x // 1.5),
    "floordiv_negative": Case(lambda x: x // -2.5),
    "floordiv_zero": Case(lambda x: torch.div(x, 0.0, rounding_mode="floor")),
    "div_trunc_scalar": Case(lambda x: torch.div(x, 1.5, rounding_mode="trunc")),
    "fmod_scalar": Case(lambda x: torch.fmod(x, 1.5)),
    "remainder_scalar": Case(lambda x: torch.remainder(x, 1.5)),
    "remainder_negative": Case(lambda x: torch.remainder(x, -1.5)),
    "exp": Case(torch.exp, ulps=1), "log": Case(torch.log, ulps=1), "log2": Case(torch.log2, ulps=1),
    "log10": Case(torch.log10, ulps=1), "sin": Case(torch.sin, ulps=1), "cos": Case(torch.cos, ulps=1),
    "tan": Case(torch.tan, ulps=1), "atan": Case(torch.atan, ulps=1), "asin": Case(torch.asin, ulps=1),
    "acos": Case(torch.acos, ulps=1), "sinh": Case(torch.sinh, ulps=1), "cosh": Case(torch.cosh, ulps=1),
    "sigmoid": Case(torch.sigmoid, ulps=2),
    "silu": Case(F.silu, ulps=2, known={torch.bfloat16: "TVM's bfloat16 silu is wrong: silu(1.0) = 1.0 (torch 0.73)"}),
    "logsigmoid": Case(F.logsigmoid, ulps=4),
    "tanh": Case(torch.tanh, ulps=4), "erf": Case(torch.erf, ulps=4),
    "gelu": Case(F.gelu, ulps=64, known={torch.float32: "torch's float32 GELU gives 0.0 for -0.0 (ours -0.0)"}),
    "gelu_tanh": Case(lambda x: F.gelu(x, approximate="tanh"), ulps=4),
    "log1p": Case(torch.log1p, ulps=1), "expm1": Case(torch.expm1, ulps=1), "atanh": Case(torch.atanh, ulps=1),
    "elu": Case(F.elu, ulps=1), "celu": Case(lambda x: F.celu(x, 0.5), ulps=1), "selu": Case(F.selu, ulps=1),
    "softshrink": Case(F.softshrink, known={dtype: "TVM's softshrink gives 0 for NaN" for dtype in FLOATS}),
}

BINARY = {
    "add": Case(torch.add), "sub": Case(torch.sub), "mul": Case(torch.mul), "div": Case(torch.div),
    "floor_divide": Case(torch.floor_divide, defined=_normal_divisor),
    "div_floor": Case(lambda a, b: torch.div(a, b, rounding_mode="floor"), defined=_normal_divisor),
    "div_trunc": Case(lambda a, b: torch.div(a, b, rounding_mode="trunc")),
    "remainder": Case(torch.remainder, defined=_normal_divisor),
    "fmod": Case(torch.fmod, defined=_normal_divisor),
    "maximum": Case(torch.maximum), "minimum": Case(torch.minimum), "pow": Case(torch.pow, ulps=1),
    "atan2": Case(torch.atan2, ulps=1), "xlogy": Case(torch.xlogy, ulps=2),
    "eq": Case(torch.eq), "ne": Case(torch.ne), "lt": Case(torch.lt), "le": Case(torch.le), "gt": Case(torch.gt),
    "ge": Case(torch.ge), "where": Case(lambda a, b: torch.where(a > b, a, b)),
}

MAX_POOL_TIES = "compiled max pooling keeps the last of tied -0.0/0.0 in a window, torch the first"
REDUCTIONS = {
    "sum": Case(lambda x: x.sum(-1), ulps=2), "sum_dim0": Case(lambda x: x.sum(0), ulps=2),
    "mean": Case(lambda x: x.mean(-1), ulps=2), "nansum": Case(lambda x: x.nansum(-1), ulps=2,
                                                               known={torch.bfloat16: "TVM has no bfloat16 isnan"}),
    "amax": Case(lambda x: x.amax(-1)), "amin": Case(lambda x: x.amin(-1)), "amax_dim0": Case(lambda x: x.amax(0)),
    "amax_all": Case(lambda x: x.amax()), "max_dim": Case(lambda x: tuple(x.max(-1))),
    "min_dim": Case(lambda x: tuple(x.min(-1))), "argmax": Case(lambda x: x.argmax(-1)),
    "argmin": Case(lambda x: x.argmin(-1)), "sort": Case(lambda x: tuple(x.sort(-1))),
    "median": Case(lambda x: tuple(x.median(-1)), index_ties=(1,)),
    "nanmedian": Case(lambda x: tuple(x.nanmedian(-1)), index_ties=(1,)),
    "kthvalue": Case(lambda x: tuple(torch.kthvalue(x, 2, -1)), index_ties=(1,)),
    "kthvalue_keepdim": Case(lambda x: tuple(torch.kthvalue(x, 4, -1, keepdim=True)), index_ties=(1,)),
    "cummax": Case(lambda x: tuple(torch.cummax(x, -1))), "cummin": Case(lambda x: tuple(torch.cummin(x, 1))),
    "cummax_dim0": Case(lambda x: tuple(torch.cummax(x, 0))),
    "cumsum": Case(lambda x: x.cumsum(-1), ulps=2),
    "logsumexp": Case(lambda x: x.logsumexp(-1), ulps=2), "softmax": Case(lambda x: x.softmax(-1), ulps=2),
    "log_softmax": Case(lambda x: x.log_softmax(-1), ulps=2), "var": Case(lambda x: x.var(-1), ulps=2),
    "std": Case(lambda x: x.std(-1), ulps=2),
    "max_pool1d": Case(lambda x: F.max_pool1d(x[:, None], 2),
                       known={dtype: MAX_POOL_TIES for dtype in FLOATS}),
    "max_pool1d_padded": Case(lambda x: F.max_pool1d(x[:, None], 3, 1, 1),
                              known={dtype: MAX_POOL_TIES for dtype in FLOATS}),
    "max_pool2d": Case(lambda x: F.max_pool2d(x.reshape(-1, 1, 2, 2), 2)),
    "avg_pool1d": Case(lambda x: F.avg_pool1d(x[:, None], 2), ulps=1),
    "avg_pool2d": Case(lambda x: F.avg_pool2d(x.reshape(-1, 1, 2, 2), 2), ulps=1),
    "adaptive_avg_pool2d": Case(lambda x: F.adaptive_avg_pool2d(x.reshape(-1, 1, 2, 2), 1), ulps=1),
}

INTEGER = {
    "add": Case(torch.add), "sub": Case(torch.sub), "mul": Case(torch.mul),
    "floor_divide": Case(torch.floor_divide), "remainder": Case(torch.remainder),
    "div_trunc": Case(lambda a, b: torch.div(a, b, rounding_mode="trunc")),
    "maximum": Case(torch.maximum), "minimum": Case(torch.minimum), "abs": Case(lambda a, b: a.abs()),
    "neg": Case(lambda a, b: -a), "ne": Case(torch.ne), "lt": Case(torch.lt),
    "sum": Case(lambda a, b: a.reshape(-1, 8).sum(-1)), "amax": Case(lambda a, b: a.reshape(-1, 8).amax(-1)),
    "cummax": Case(lambda a, b: tuple(torch.cummax(a.reshape(-1, 8), 1))),
    "kthvalue": Case(lambda a, b: torch.kthvalue(a.reshape(-1, 8), 3, 1).values),
}


def _integer_inputs(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([-7, -3, -1, 0, 1, 2, 5, 100], dtype=dtype)
    a, b = _grid(values)
    return a, torch.where(b == 0, torch.ones_like(b) * 3, b)  # torch raises on an integer division by zero


GROUPS = {
    "unary": (UNARY, FLOATS, lambda dtype: (_specials(dtype),)),
    "binary": (BINARY, FLOATS, lambda dtype: _grid(_specials(dtype))),
    "reduction": (REDUCTIONS, FLOATS, lambda dtype: (_rows(dtype),)),
    "integer": (INTEGER, INTEGERS, _integer_inputs),
}


class Group(nn.Module):
    """Every op of a group on the same inputs: a flat tuple of their outputs."""

    def __init__(self, cases: dict[str, Case], dtype) -> None:
        super().__init__()
        self.ops = [case.op for case in cases.values() if dtype not in case.known or "fails to build" not in
                    case.known[dtype] and "TVM has no" not in case.known[dtype]]

    def forward(self, *inputs):
        outputs = []
        for op in self.ops:
            out = op(*inputs)
            outputs.extend(out if isinstance(out, tuple) else (out,))
        return tuple(outputs)


def _refused(case: Case, dtype) -> bool:
    reason = case.known.get(dtype, "")
    return "fails to build" in reason or "TVM has no" in reason


@functools.cache
def _compiled(group: str, dtype):
    """(inputs, {op name: (compiled outputs, eager outputs)}) of a group in ``dtype``, or the StructfxError
    compiling it raised (cached too: one failure, not one per op)."""
    cases, _, make = GROUPS[group]
    inputs = make(dtype)
    model = Group(cases, dtype).eval()
    try:
        got = sfx.compile(model, inputs)(*inputs)
    except sfx.StructfxError as e:
        return e
    want = model(*inputs)
    outputs, position = {}, 0
    for name, case in cases.items():
        if _refused(case, dtype):
            continue
        count = len(case.op(*inputs)) if isinstance(case.op(*inputs), tuple) else 1
        outputs[name] = (got[position:position + count], want[position:position + count])
        position += count
    return inputs, outputs


def _magnitude(t: torch.Tensor) -> torch.Tensor:
    bits = t.view(BITS[t.dtype]).to(torch.int64)
    return bits & ((1 << (torch.finfo(t.dtype).bits - 1)) - 1)


def _check(got: torch.Tensor, want: torch.Tensor, ulps: int, defined) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if defined is not None:
        got, want = got[defined], want[defined]
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{got} != {want}"
        return
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"NaN at {got.isnan().nonzero().tolist()}, torch at {nan.nonzero().tolist()}"
    got, want = got[~nan], want[~nan]
    assert torch.equal(got.signbit(), want.signbit()), f"sign: {got} != {want}"
    distance = (_magnitude(got) - _magnitude(want)).abs()
    far = distance > ulps
    assert torch.equal(got.isinf(), want.isinf()) and not far.any(), (
        f"more than {ulps} ulps: {got[far]} != {want[far]}")


def _same_in_order(values: torch.Tensor, chosen: torch.Tensor) -> bool:
    """Equal in torch's order: NaN with NaN, -0.0 with 0.0."""
    return bool(((values == chosen) | (values.isnan() & chosen.isnan())).all())


def _params():
    for group, (cases, dtypes, _) in GROUPS.items():
        for dtype in dtypes:
            for name, case in cases.items():
                marks = []
                if dtype in case.known:
                    if _refused(case, dtype):
                        continue
                    marks = [pytest.mark.xfail(strict=True, reason=case.known[dtype])]
                yield pytest.param(group, name, dtype, id=f"{group}-{name}-{str(dtype).removeprefix('torch.')}",
                                   marks=marks)


@pytest.mark.parametrize(("group", "name", "dtype"), list(_params()))
def test_compiled_op_matches_eager_on_special_values(group, name, dtype):
    case = GROUPS[group][0][name]
    compiled = _compiled(group, dtype)
    if isinstance(compiled, Exception):
        raise compiled
    inputs, outputs = compiled
    got, want = outputs[name]
    defined = case.defined(*inputs) if case.defined is not None else None
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if case.index_ties and k == 0:  # torch's quickselect returns any of tied values (-0.0 or 0.0)
            assert _same_in_order(g, w), f"{g} != {w}"
            continue
        if k in case.index_ties:  # got[0] are the values, g their indices along the last dim
            x, values = inputs[0], got[0]
            index = g if g.dim() == x.dim() else g.unsqueeze(-1)
            assert _same_in_order(x.gather(-1, index), values if values.dim() == x.dim() else values.unsqueeze(-1))
            continue
        _check(g, w, case.ulps, defined)
