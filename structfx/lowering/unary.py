"""torch's ``log1p``, ``expm1``, ``atanh`` and ELU family (``elu``, ``celu``, ``selu``) with their small arguments.

TVM's converters write ``log1p(x)`` as ``log(1 + x)``, ``expm1(x)`` as ``exp(x) - 1``, ``atanh`` as a quotient of
logarithms and ELU as ``alpha * relu(1 - exp(x)) + relu(x)``: the small arguments these functions exist for were
lost (``log1p(1e-8)`` was 0, subnormals flushed to 0, ``-0.0`` became ``0.0``), and TVM's ``selu`` in float64
and bfloat16 dropped its scale (``selu(1.0)`` was 1.0, torch 1.0507). Here they call the C library's functions
(``log1p``, ``expm1``, ``atanh``; correctly rounded to within an ulp, as torch's Sleef ones are) and ELU is
ATen's ``x > 0 ? x * scale : expm1(x * input_scale) * alpha * scale``. float16 and bfloat16 are computed in
float32 and rounded once, as torch's CPU kernels do. The calls are scalar (libm does not vectorise): these ops
are rare in models, and correct first.
"""

from __future__ import annotations

import torch

from structfx.errors import StructfxError
from structfx.lowering.compat import relax, te, tirx

#: The dtype each float dtype is computed in, and the C library's suffix for it.
COMPUTE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
SUFFIX = {"float32": "f", "float64": ""}

#: torch.nn.functional.selu's constants (torch/nn/functional.py, from Klambauer et al. 2017).
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def libm(name: str, x):
    """The C library's ``name`` of the float32 or float64 expression ``x``."""
    dtype = str(x.ty)
    return tirx.call_pure_extern(dtype, name + SUFFIX[dtype], x)


def _elementwise(node: torch.fx.Node, importer, formula, name: str) -> relax.Var:
    """``formula`` (of a scalar expression in the compute dtype) of the node's input, in the node's float dtype."""
    out = str(node.meta["val"].dtype).removeprefix("torch.")
    if out not in COMPUTE:
        raise StructfxError(f"[import] {node.format_node()}: aten.{name} computes in {out}, which structfx does not "
                            f"lower; compile the model in one of {sorted(COMPUTE)}")
    compute = COMPUTE[out]

    def kernel(x):
        return te.compute(x.shape, lambda *i: formula(x(*i).astype(compute)).astype(out), name=name)

    return importer.block_builder.emit_te(kernel, importer.env[node.args[0]], primfunc_name_hint=name)


def library(name: str):
    """Converter of a unary op computed by the C library's ``name``."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        return _elementwise(node, importer, lambda x: libm(name, x), name)

    return convert


def elu(alpha: float, scale: float, input_scale: float):
    """ATen's ELU of a scalar expression: ``x * scale`` above 0, ``expm1(x * input_scale) * alpha * scale``
    elsewhere (NaN stays NaN)."""

    def formula(x):
        dtype = str(x.ty)
        positive = x > tirx.const(0.0, dtype)
        negative = libm("expm1", x * tirx.const(input_scale, dtype)) * tirx.const(alpha * scale, dtype)
        return tirx.Select(positive, x * tirx.const(scale, dtype), negative)

    return formula


def _argument(node: torch.fx.Node, position: int, name: str, default: float) -> float:
    return float(node.args[position] if len(node.args) > position else node.kwargs.get(name, default))


def convert_elu(node: torch.fx.Node, importer) -> relax.Var:
    """``elu(x, alpha=1, scale=1, input_scale=1)``."""
    formula = elu(_argument(node, 1, "alpha", 1.0), _argument(node, 2, "scale", 1.0),
                  _argument(node, 3, "input_scale", 1.0))
    return _elementwise(node, importer, formula, "elu")


def convert_celu(node: torch.fx.Node, importer) -> relax.Var:
    """``celu(x, alpha=1)``: ATen's ``elu(x, alpha, 1, 1 / alpha)``."""
    alpha = _argument(node, 1, "alpha", 1.0)
    return _elementwise(node, importer, elu(alpha, 1.0, 1.0 / alpha), "celu")


def convert_selu(node: torch.fx.Node, importer) -> relax.Var:
    """``selu(x)``: ATen's ``elu(x, SELU_ALPHA, SELU_SCALE, 1)``."""
    return _elementwise(node, importer, elu(SELU_ALPHA, SELU_SCALE, 1.0), "selu")


CONVERTERS = {
    "log1p.default": library("log1p"),
    "expm1.default": library("expm1"),
    "atanh.default": library("atanh"),
    "elu.default": convert_elu,
    "celu.default": convert_celu,
    "selu.default": convert_selu,
}
