"""torch's float floor division and remainder, special values included.

TVM lowers ``floor_divide`` (``a // b``, ``div(a, b, rounding_mode="floor")``) to ``floor(a / b)`` and
``remainder`` to ``a - floor(a / b) * b``. On special values these are not torch's: ``inf // 1.5`` was inf
(torch: NaN), ``remainder(-0.0, 2.0)`` and ``remainder(-1.5, 1.5)`` were 0.0 (torch: -0.0), ``remainder(x, inf)``
was NaN (torch: ``x``, or inf for a negative ``x``).

Here both are computed as ATen's CPU kernels compute them (``div_floor_floating`` and the remainder kernel
of ``BinaryOpsKernel.cpp``), from ``fmod`` (exact):

- ``a // b``: ``a / b`` where ``b == 0``; else ``div = (a - fmod(a, b)) / b``, less 1 where the nonzero
  remainder's sign differs from ``b``'s; then ``floor(div)``, plus 1 where ``div - floor(div) > 0.5``; a zero
  ``div`` gives zero with the sign of ``a / b``;
- ``remainder(a, b)``: ``fmod(a, b)``, plus ``b`` where it is nonzero and its sign differs from ``b``'s;
- ``fmod`` itself goes through the same path, so that bfloat16 is computed in float32 (TVM's bfloat16 fmod
  failed to build: "dtype mismatch on BufferStore").

float16 and bfloat16 are computed in float32 and rounded once, as torch's kernels do. Integer operands keep
TVM's converters (floor division and floor modulo, which are torch's for a nonzero divisor).
"""

from __future__ import annotations

import math

import torch

from structfx.lowering.compat import relax, te, tirx

#: The dtype each float dtype is computed in.
COMPUTE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}


def fmod(a, b):
    """C's ``fmod`` of two float scalar expressions (exact; TVM's ``truncmod`` of floats is LLVM's ``frem``,
    which is it). A constant zero ``b`` gives NaN, as ``fmod``."""
    if _is_zero(b):
        return tirx.const(math.nan, str(a.ty))
    return tirx.truncmod(a, b)


def _is_zero(b) -> bool:
    return isinstance(b, tirx.FloatImm) and b.value == 0.0


def _signs_differ(mod, b):
    """``mod != 0 and (b < 0) != (mod < 0)`` (TVM lowers ``!=`` of booleans to a float compare LLVM rejects)."""
    zero = tirx.const(0.0, str(mod.ty))
    negative_mod, negative_b = mod < zero, b < zero
    return tirx.And(tirx.Not(mod == zero), tirx.Or(tirx.And(negative_b, tirx.Not(negative_mod)),
                                                   tirx.And(tirx.Not(negative_b), negative_mod)))


def floor_divide(a, b):
    """``a // b`` of two float scalar expressions, as ATen's ``div_floor_floating``. A constant zero ``b``
    (which TVM's simplifier refuses to divide by) gives ``a / b`` as ``a * copysign(inf, b)``, its value."""
    dtype = str(a.ty)
    if _is_zero(b):
        return a * tirx.const(math.copysign(math.inf, b.value), dtype)
    zero, one, half = (tirx.const(v, dtype) for v in (0.0, 1.0, 0.5))
    quotient = a / b
    mod = fmod(a, b)
    div = (a - mod) / b
    div = tirx.Select(_signs_differ(mod, b), div - one, div)
    floored = tirx.floor(div)
    floored = tirx.Select(div - floored > half, floored + one, floored)
    floored = tirx.Select(div == zero, tirx.copysign(zero, quotient), floored)
    return tirx.Select(b == zero, quotient, floored)


def remainder(a, b):
    """``remainder(a, b)`` of two float scalar expressions, as ATen's CPU kernel: ``fmod`` moved to ``b``'s sign
    (NaN for a constant zero ``b``, as ``fmod``)."""
    if _is_zero(b):
        return tirx.const(math.nan, str(a.ty))
    mod = fmod(a, b)
    return tirx.Select(_signs_differ(mod, b), mod + b, mod)


def _broadcast(shapes: list[list]) -> list:
    """numpy's broadcast of ``shapes`` (a static 1 yields to the other extent)."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        extents = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        wide = [e for e in extents if not (isinstance(e, tirx.IntImm) and int(e) == 1)]
        out.append(wide[0] if wide else extents[0])
    return out


def _reader(tensor: te.Tensor, rank: int):
    """Reads ``tensor`` at an index of the broadcast shape of rank ``rank``."""
    shape = list(tensor.shape)
    offset = rank - len(shape)

    def read(index):
        return tensor(*[tirx.const(0, index[offset + k].dtype) if isinstance(e, tirx.IntImm) and int(e) == 1
                        else index[offset + k] for k, e in enumerate(shape)])

    return read


def _elementwise(formula, name: str):
    """TE function of two tensors (a scalar may stand for either) computing ``formula`` in ``compute`` and
    casting to ``out``, broadcast as numpy does."""

    def kernel(a, b, compute: str, out: str):
        tensors = [v for v in (a, b) if isinstance(v, te.Tensor)]
        shape = _broadcast([list(t.shape) for t in tensors])
        readers = [_reader(v, len(shape)) if isinstance(v, te.Tensor) else (lambda index, v=v: tirx.const(v, compute))
                   for v in (a, b)]

        def element(*index):
            x, y = (read(index) for read in readers)
            return formula(x.astype(compute), y.astype(compute)).astype(out)

        return te.compute(shape, element, name=name)

    return kernel


def converter(formula, name: str, fallback):
    """Converter of a float binary op computing ``formula`` (of two scalar expressions in the compute dtype), and
    ``fallback(node, importer)`` for other dtypes."""
    kernel = _elementwise(formula, name)

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        out = str(node.meta["val"].dtype).removeprefix("torch.")
        if out not in COMPUTE:
            return fallback(node, importer)
        operands = [importer.env[v] if isinstance(v, torch.fx.Node) else float(v) for v in node.args[:2]]
        return importer.block_builder.emit_te(kernel, *operands, COMPUTE[out], out, primfunc_name_hint=name)

    return convert

