"""Vectorisable float32 legalizations of erf, tanh, sigmoid and the ops built on them (and exp) on the CPU.

TVM legalizes these Relax ops to TIR's ``exp`` / ``erf`` / ``tanh`` / ``sigmoid`` intrinsics, which LLVM
lowers to calls of the C library's scalar functions, one element at a time, however the loop is
vectorised: GELU on (256, 512) floats took 3.1 ms, against 0.08 ms for the same kernel on TVM's
polynomial versions (``topi.fast_exp``: Cephes' exp, a degree-5 polynomial scaled by 2^n built from the
float's exponent bits; ``topi.fast_erf`` and ``topi.fast_tanh``: Eigen's rational approximations), which
are plain arithmetic and vectorise (measured on this 2-core AVX2 host, one kernel each, same run). Their
error is a few float32 ulps: relative 2.5e-7 (exp), 2.6e-7 (tanh), 1.2e-7 (sigmoid), absolute 1e-6 for
GELU over inputs of standard deviation 4, against float64 references. Inside softmax (``fast_softmax``)
``exp`` sees only scores minus their row's maximum, so exp of -inf is exactly 0 (masked attention scores).
A bare ``exp`` keeps TVM's own (libm) legalization: ``fast_exp`` saturates at exp(+-88.38), which gave
inf between 88.38 and float32's true overflow at 88.72 and flushed results below 1e-38 to zero.

bfloat16 erf, tanh and GELU are computed so too, widened to float32 and rounded once, as torch's CPU kernels
compute them (TVM's own bfloat16 tanh gave 0.0 for -0.0). In float64, ``tanh`` and GELU's tanh form call the C
library's tanh (TVM's LLVM lowering of float64 tanh lost -0.0 and subnormals, and was 1e14 ulps off in GELU at
x = -7). Other dtypes keep TVM's own legalization.

``x ** c`` for a constant ``c`` in {2, 3, -1, -2} (GELU's tanh form cubes its input, RMS norm squares it)
runs as torch runs it (ATen's ``pow_tensor_scalar_optimized_kernel``): products and a division, in any
float dtype, bit for bit torch's results, instead of a libm ``pow`` per element. transformers'
``NewGELUActivation`` (GPT-2's) on (512, 512) floats went from 4.2-6.6 ms to 0.27-0.53 ms (one process,
three rounds). Other exponents keep TVM's legalization. bfloat16 powers (TVM has none) are computed in float32 and
rounded once, as torch's.
"""

from __future__ import annotations

import math

from structfx.lowering.compat import relax, te, tirx, topi, tvm


def _erf(x: te.Tensor) -> te.Tensor:
    """erf, NaN kept NaN (``fast_erf`` clamps its input first, which turns NaN into +-1)."""
    erf = topi.fast_erf(x)
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), erf(*i)), name="T_erf")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + e(*i)),
                      name="T_sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    return topi.multiply(x, _sigmoid(x))


def _gelu(x: te.Tensor) -> te.Tensor:
    """x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, as TVM's own legalization writes it."""
    erf = topi.fast_erf(topi.multiply(x, tirx.const(0.5**0.5, "float32")))
    half = tirx.const(0.5, "float32")
    return te.compute(x.shape, lambda *i: x(*i) * (half + erf(*i) * half), name="T_gelu")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    """x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2, as TVM's own legalization writes it."""
    scale, cubic = tirx.const(math.sqrt(2.0 / math.pi), "float32"), tirx.const(0.044715, "float32")
    inner = te.compute(x.shape, lambda *i: scale * x(*i) * (tirx.const(1.0, "float32") + cubic * x(*i) * x(*i)),
                       name="T_gelu_inner")
    tanh = topi.fast_tanh(inner)
    half = tirx.const(0.5, "float32")
    return te.compute(x.shape, lambda *i: half * x(*i) * (tirx.const(1.0, "float32") + tanh(*i)), name="T_gelu_tanh")


#: Relax op -> (TE function of the input tensor and the call's attrs, name of the kernel).
FAST = {
    "relax.erf": (lambda x, attrs: _erf(x), "fast_erf"),
    "relax.tanh": (lambda x, attrs: topi.fast_tanh(x), "fast_tanh"),
    "relax.sigmoid": (lambda x, attrs: _sigmoid(x), "sigmoid"),
    "relax.nn.silu": (lambda x, attrs: _silu(x), "silu"),
    "relax.nn.gelu": (lambda x, attrs: _gelu(x), "gelu"),
    "relax.nn.gelu_tanh": (lambda x, attrs: _gelu_tanh(x), "gelu_tanh"),
    "relax.nn.softmax": (lambda x, attrs: topi.nn.fast_softmax(x, int(attrs.axis)), "softmax"),
}


def _libm_tanh(x):
    """The C library's ``tanh`` of a float64 expression (TVM's LLVM lowering writes it as a quotient of
    exponentials: ``tanh(-0.0)`` was 0.0, subnormals 0, and GELU's tanh form 1e14 ulps off at -7)."""
    return tirx.call_pure_extern("float64", "tanh", x)


def _tanh64(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: _libm_tanh(x(*i)), name="T_tanh")


def _gelu_tanh64(x: te.Tensor) -> te.Tensor:
    """ATen's float64 GELU, tanh form: ``0.5 x (1 + tanh(beta (x + kappa x^3)))``, with the C library's tanh."""
    beta = tirx.const(math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5, "float64")
    kappa = tirx.const(0.044715, "float64")
    one, half = tirx.const(1.0, "float64"), tirx.const(0.5, "float64")

    def element(*i):
        inner = beta * (x(*i) + kappa * (x(*i) * x(*i) * x(*i)))
        return half * x(*i) * (one + _libm_tanh(inner))

    return te.compute(x.shape, element, name="T_gelu_tanh")


#: The ops of FAST a bfloat16 call of which is computed in float32 (those on ``fast_exp``, whose exponent-bit
#: arithmetic came out wrong next to bfloat16 casts, keep TVM's legalization).
WIDENED = ("relax.erf", "relax.tanh", "relax.nn.gelu", "relax.nn.gelu_tanh")

#: Relax op -> float64 TE function where TVM's own legalization is inexact.
FLOAT64 = {"relax.tanh": _tanh64, "relax.nn.gelu_tanh": _gelu_tanh64}


def _legalization(name: str):
    compute, hint = FAST[name]
    default = tvm.ir.Op.get(name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        dtype = call.ty.dtype
        if dtype == "float64" and name in FLOAT64:
            return bb.call_te(FLOAT64[name], call.args[0], primfunc_name_hint=hint)
        if dtype != "float32" and (dtype != "bfloat16" or name not in WIDENED):
            return default(bb, call)

        x = call.args[0]
        if dtype == "bfloat16":  # widened and the result rounded once, as torch's CPU kernels
            x = bb.emit_te(topi.cast, x, "float32", primfunc_name_hint="widen")
        result = bb.call_te(lambda x: compute(x, call.attrs), x, primfunc_name_hint=hint)
        if dtype == "bfloat16":
            result = bb.call_te(topi.cast, bb.emit(result), dtype, primfunc_name_hint="narrow")
        return result

    return legalize


#: Constant exponent -> (x, 1 in x's dtype) -> x ** exponent as torch computes it, without ``pow``, and the
#: dtypes it is torch's form for. torch's CPU kernel (ATen's ``pow_tensor_scalar_kernel``) computes
#: ``x ** 0.5`` as ``sqrt(x)`` and ``x ** -0.5`` as ``1 / sqrt(x)`` in float32 and float64: so
#: ``(-0.0) ** 0.5`` is -0.0 and ``(-inf) ** 0.5`` NaN there, where ``pow`` gives 0.0 and inf. In float16
#: torch calls ``pow`` itself, which TVM's legalization already matches bit for bit.
POWERS = {
    2.0: (lambda x, one: x * x, ("float16", "float32", "float64")),
    3.0: (lambda x, one: x * x * x, ("float16", "float32", "float64")),
    -2.0: (lambda x, one: one / (x * x), ("float16", "float32", "float64")),
    -1.0: (lambda x, one: one / x, ("float16", "float32", "float64")),
    0.5: (lambda x, one: tirx.sqrt(x), ("float32", "float64")),
    -0.5: (lambda x, one: one / tirx.sqrt(x), ("float32", "float64")),
}


def _constant_exponent(expr: relax.Expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().ndim == 0:
        return float(expr.value.numpy())
    return None


def _power_legalization():
    default = tvm.ir.Op.get("relax.power").get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.ty.dtype == "bfloat16":
            return _widened_power(bb, call)
        power, dtypes = POWERS.get(_constant_exponent(call.args[1]), (None, ()))
        if call.ty.dtype not in dtypes:
            return default(bb, call)
        one = tirx.const(1.0, call.ty.dtype)
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: power(x(*i), one), name="T_power"),
                          call.args[0], primfunc_name_hint="power")

    return legalize


def _float32(bb: relax.BlockBuilder, value: relax.Expr) -> relax.Expr:
    """``value`` in float32: a constant converted (so POWERS still sees it), anything else cast."""
    if isinstance(value, tvm.ir.expr.Constant):
        return relax.const(value.value.numpy().astype("float32"), "float32")
    return bb.normalize(relax.op.astype(value, "float32"))


def _widened_power(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """A bfloat16 ``power`` (TVM's has none: "power only applies to float") in float32, rounded once, as torch's
    CPU kernel computes it (bfloat16 widened to float, ``pow`` or POWERS' float32 form, narrowed)."""
    wide = relax.Call(call.op, [_float32(bb, arg) for arg in call.args], call.attrs)
    return bb.normalize(relax.op.astype(_power_legalization()(bb, bb.normalize(wide)), "bfloat16"))


def fast_math_legalizations() -> dict:
    """The ``customize_legalize_map`` for ``relax.transform.LegalizeOps``: every op of FAST on float32
    through TVM's vectorisable approximations, any other dtype through TVM's own legalization; ``power``
    by a constant of POWERS as torch computes it."""
    return {"relax.power": _power_legalization(), **{name: _legalization(name) for name in FAST}}
