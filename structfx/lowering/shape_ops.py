"""Shape ops imported with the output shape torch.export proved, not the one TVM rebuilds from their arguments.

TVM's converters build a shape op's target from its arguments as the importer converted them: ``-1``
entries, sizes read with ``sym_size`` (a Relax value, a constant or a shape variable), and sizes computed
from them (``x.size(0) * k``). That fails by kind on a symbolic batch:

- ``view``/``reshape`` (and what core ATen makes of ``flatten``, ``unflatten``, ``movedim``): TVM compares
  the target with the input's shape in Python (``list(shape) == list(dims)``), which raises "Cannot use
  and / or / not operator to Expr" as soon as an entry is symbolic (GPTBigCode's attention).
- ``repeat`` with a symbolic count (WavLM's ``position_bias.repeat(batch, 1, 1, 1)``): ``relax.op.tile``
  takes ints only.
- ``expand`` with ``-1`` or computed sizes rebuilds what torch already knew.
- ``arange`` with a negative integer step (Funnel's relative positions, ``arange(8, -8, -1)``): TVM's
  shape inference gives it ``ceil((end - start + step - 1) / step)`` elements, 18 instead of 16, so the
  next ``expand`` fails; its legalised kernel makes 16 (values right, shapes wrong).

Here each output size is torch's own (``node.meta["val"]``), its sympy expression written over the TIR
shape variables of the program's inputs (``size_vars``): the target of a reshape or expand needs no
argument, and a repeat's counts are the output sizes over the input's. Where a size does not translate
(an unbacked size, an expression of a kind not listed in ``tir_size``), TVM's own converter is used.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
from torch.utils._sympy import functions as torch_sympy

from structfx.lowering.compat import relax, tirx, tvm


def size_vars(node: torch.fx.Node, importer) -> dict[str, tirx.Var]:
    """The TIR shape variables of the program's inputs, by torch's name for the symbol each stands for
    (TVM names them after torch's symbols: ``s72``)."""
    found = {}
    for placeholder in node.graph.find_nodes(op="placeholder"):
        value = importer.env.get(placeholder)
        ty = getattr(value, "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            continue
        for size in ty.shape.values:
            if not isinstance(size, tirx.IntImm):
                found.update((v.name, v) for v in tirx.analysis.undefined_vars(size))
    return found


def tir_size(expr: sympy.Expr, names: dict[str, tirx.Var]) -> tirx.PrimExpr | None:
    """``expr`` (a torch size: integers, input symbols, +, *, floor and ceiling division, modulo, min,
    max, natural powers) as an int64 TIR expression over ``names``; None for anything else."""
    if isinstance(expr, sympy.Integer):
        return tirx.IntImm("int64", int(expr))
    if isinstance(expr, sympy.Symbol):
        return names.get(expr.name)
    args = [tir_size(a, names) for a in expr.args]
    if not args or any(a is None for a in args):
        return None
    if isinstance(expr, (sympy.Pow, torch_sympy.PowByNatural)):
        exponent = expr.args[1]
        if not (isinstance(exponent, sympy.Integer) and int(exponent) >= 0):
            return None
        return math.prod([args[0]] * int(exponent), start=tirx.IntImm("int64", 1))
    combine = next((f for kind, f in _COMBINE.items() if isinstance(expr, kind)), None)
    return None if combine is None else combine(args)


def _fold(op):
    def combine(args):
        result = args[0]
        for a in args[1:]:
            result = op(result, a)
        return result

    return combine


_COMBINE = {
    sympy.Add: _fold(operator.add),
    sympy.Mul: _fold(operator.mul),
    torch_sympy.FloorDiv: _fold(tirx.floordiv),
    torch_sympy.CeilDiv: lambda args: tirx.floordiv(args[0] + args[1] - 1, args[1]),
    torch_sympy.Mod: _fold(tirx.floormod),
    torch_sympy.PythonMod: _fold(tirx.floormod),
    torch_sympy.Max: _fold(tirx.max),
    torch_sympy.Min: _fold(tirx.min),
}


def torch_shape(node: torch.fx.Node, importer) -> list[tirx.PrimExpr] | None:
    """The shape torch gives ``node``'s tensor result, in TIR; None where a size does not translate."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    names = size_vars(node, importer)
    sizes = [tir_size(_sympy(s), names) for s in value.shape]
    return None if any(s is None for s in sizes) else sizes


def _sympy(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def with_torch_shape(node: torch.fx.Node, importer, value: relax.Expr) -> relax.Expr:
    """``value`` (the Relax result of ``node``) cast to torch's shape where TVM's converter left its shape
    or rank unknown (``index`` with several index tensors), so that the ops after it have one; checked
    when the program runs. Any other value is returned as it is."""
    ty = getattr(value, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is not None:
        return value
    shape = torch_shape(node, importer)
    if shape is None:
        return value
    return importer.block_builder.match_cast(value, relax.TensorType(shape, ty.dtype))


def convert_reshape(node: torch.fx.Node, importer) -> relax.Var:
    """``view``/``reshape``/``_unsafe_view`` to torch's output shape (TVM's reading of a literal 0 as
    "copy this dim" kept out, as its own converter does)."""
    shape = torch_shape(node, importer)
    if shape is None:
        return importer._reshape(node)
    x = importer.env[node.args[0]]
    if _same_shape(x, shape):
        return x
    return importer._emit_torch_reshape(x, shape)


def _same_shape(x: relax.Expr, shape: list) -> bool:
    current = x.ty.shape
    if current is None or len(current.values) != len(shape):
        return False
    analyzer = tvm.sym.Analyzer()
    return all(analyzer.can_prove_equal(a, b) for a, b in zip(current.values, shape))


def convert_expand(node: torch.fx.Node, importer) -> relax.Var:
    """``expand(x, sizes)`` as ``broadcast_to`` torch's output shape (its ``-1`` entries and computed sizes
    resolved by torch)."""
    shape = torch_shape(node, importer)
    if shape is None:
        return importer._expand(node)
    return importer.block_builder.emit(relax.op.broadcast_to(importer.env[node.args[0]], shape))


def convert_repeat(node: torch.fx.Node, importer) -> relax.Var:
    """``repeat(x, counts)``: ``tile`` where the counts are ints; with a symbolic count, x with a unit dim
    before each of its dims, broadcast to the counts there and reshaped to torch's output shape
    (``(1, d0, 1, d1) -> (r0, d0, r1, d1) -> (r0 * d0, r1 * d1)``)."""
    counts = node.args[1]
    if all(isinstance(c, int) for c in counts):
        return importer.block_builder.emit(relax.op.tile(importer.env[node.args[0]], list(counts)))
    shape = torch_shape(node, importer)
    names = size_vars(node, importer)
    repeats = [tir_size(_sympy(c.meta["val"] if isinstance(c, torch.fx.Node) else c), names) for c in counts]
    x = importer.env[node.args[0]]
    if shape is None or any(r is None for r in repeats) or x.ty.shape is None:
        return importer._repeat(node)
    emit = importer.block_builder.emit
    sizes = [tirx.IntImm("int64", 1)] * (len(counts) - len(x.ty.shape.values)) + list(x.ty.shape.values)
    spread = [s for size in sizes for s in (tirx.IntImm("int64", 1), size)]
    tiled = [s for count, size in zip(repeats, sizes) for s in (count, size)]
    spread_x = emit(relax.op.reshape(x, spread))
    return emit(relax.op.reshape(emit(relax.op.broadcast_to(spread_x, tiled)), shape))


def convert_arange(node: torch.fx.Node, importer) -> relax.Var:
    """``arange(start, end, step)`` with a negative integer step as ``start + step * arange(n)``, n torch's
    length; any other arange is TVM's (its length is right for a positive step)."""
    start, end, step = _arange_arguments(node)
    value = node.meta.get("val")
    shape = torch_shape(node, importer)
    integer = isinstance(value, torch.Tensor) and not value.is_floating_point()
    if not (isinstance(step, int) and step < 0 and isinstance(start, int) and integer and shape is not None):
        return importer._arange(node)
    dtype = str(value.dtype).removeprefix("torch.")
    emit = importer.block_builder.emit
    index = emit(relax.op.arange(tirx.IntImm("int64", 0), shape[0], tirx.IntImm("int64", 1), dtype=dtype))
    scaled = emit(relax.op.multiply(index, relax.const(step, dtype)))
    return emit(relax.op.add(scaled, relax.const(start, dtype)))


def _arange_arguments(node: torch.fx.Node) -> tuple:
    """(start, end, step) of any ``aten.arange`` overload."""
    names = [a.name for a in node.target._schema.arguments]
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    return bound.get("start", 0), bound.get("end"), bound.get("step", 1)


CONVERTERS = {
    "view.default": convert_reshape,
    "reshape.default": convert_reshape,
    "_unsafe_view.default": convert_reshape,
    "expand.default": convert_expand,
    "repeat.default": convert_repeat,
    "arange.default": convert_arange,
    "arange.start": convert_arange,
    "arange.start_step": convert_arange,
}
