"""Converters that stand in for TVM's own where its importer loses what torch.export proved.

- ``aten.slice.Tensor`` with a symbolic end (``position_ids[:, :seq]`` in BERT-like embeddings):
  TVM emits a strided_slice of extent ``min(seq, 512)``, since it does not know ``seq <= 512``, and the
  shapes downstream become unknown (then our converters, and broadcasting, have no shape to work
  with). Where torch's own output size is exactly ``end - start`` (it proved the slice in bounds), the
  slice is emitted with ``assume_inbound=True``, so its extent is ``end - start``.
- Matrix products (``aten.mm``, ``bmm``, ``matmul``, ``addmm``, ``linear``): TVM's converters fix their
  result to float32, so a float64 (or float16) model fails at import (``R.add(p_0_bias, lv1) uses
  datatype T.float64 on the LHS ... T.float32 on the RHS``). They are emitted in the dtype torch computes
  them in (the node's own result dtype); float16 and bfloat16 ones on float32 operands (exact widenings;
  a dense layer's weight is widened once, at compile time, with its packing) with float32 sums rounded
  once, as torch's CPU kernels do. TVM's convolutions and ``baddbmm`` also compute in float32 only:
  in another dtype they are refused with a StructfxError naming the op and the fix.
- ``div(x, 2, rounding_mode=...)``: TVM's converter divides by an int32 constant, refused for a float
  ``x``; ours makes the scalar the result's dtype (``convert_div_mode``). Float floor division, ``remainder``
  and ``fmod`` are ATen's formulas (``structfx.lowering.division``: ``inf // 1.5`` was inf, torch NaN).
- ``a != b`` is true where a float operand is NaN (``convert_not_equal``); ``isnan``/``isinf`` of bfloat16
  widen it first (TVM has neither); ``cumsum`` makes a zero sum ``0.0``, as torch's sums start from it.
- ``log1p``, ``expm1``, ``atanh`` and the ELU family are ``structfx.lowering.unary``'s (libm and ATen's
  formula: TVM's lost -0.0 and subnormals, and its ``selu`` its scale in float64 and bfloat16).
- ``aten.embedding``: TVM's take reads outside the table for an id outside it; ours clamps
  (``convert_embedding``). So do tensor indexing with one index tensor (``x[idx]``, ``x[:, idx]``:
  ``aten.index.Tensor``) and ``index_select``, after wrapping negative indices as torch does
  (``convert_index``): TVM's ``fast`` take read past the tensor (garbage, or a segfault).
- Max and min over dims (``aten.amax``, ``amin``: TVM has no converter): a ``max``/``min`` reduction
  (NaN-propagating, as torch's, through ``structfx.lowering.nan_propagation``). ``max.dim``, ``min.dim``,
  ``argmax``, ``argmin``, ``sort``, ``argsort``, ``topk``, ``median``, ``nanmedian``, ``kthvalue``, ``cummax``
  and ``cummin`` are ``structfx.lowering.ordering``'s.
"""

from __future__ import annotations

import operator

import sympy
import torch

from structfx.errors import StructfxError
from structfx.lowering import division
from structfx.lowering.compat import relax, tvm
from structfx.lowering.ordering import CONVERTERS as ORDERING_CONVERTERS
from structfx.lowering.shape_ops import CONVERTERS as SHAPE_CONVERTERS
from structfx.lowering.shape_ops import with_torch_shape
from structfx.lowering.symbolic_scalars import CONVERTERS as SYMBOLIC_SCALAR_CONVERTERS
from structfx.lowering.unary import CONVERTERS as UNARY_CONVERTERS

INT64_MAX = 2**63 - 1


def convert_slice(node: torch.fx.Node, importer) -> relax.Var:
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if not _proved_in_bounds(x, node, dim, start, end, step):
        return importer._slice(node)
    begin_value, end_value = (importer.env[v] if isinstance(v, torch.fx.Node) else v for v in (start, end))
    if not all(isinstance(v, int) or tvm.ir.is_prim_expr(v) for v in (begin_value, end_value)):
        return importer._slice(node)
    return importer.block_builder.emit(
        relax.op.strided_slice(importer.env[x], [dim], [begin_value], [end_value], [step], assume_inbound=True)
    )


def _proved_in_bounds(x, node, dim, start, end, step) -> bool:
    if step != 1 or end is None or not isinstance(dim, int) or dim < 0:
        return False
    sizes = [_expr(v) for v in (start, end)]
    out = node.meta.get("val")
    if None in sizes or not isinstance(out, torch.Tensor) or (isinstance(end, int) and end >= INT64_MAX):
        return False
    if not isinstance(start, int) or start < 0:
        return False
    return sympy.simplify(_expr(out.shape[dim]) - (sizes[1] - sizes[0])) == 0


def _expr(value):
    """A size as a sympy expression: ints, SymInts, and fx nodes whose value is one."""
    if isinstance(value, torch.fx.Node):
        value = value.meta.get("val")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return None


def _result_dtype(node: torch.fx.Node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")


def _accumulator(dtype: str) -> str:
    """The dtype torch's CPU matrix products accumulate ``dtype`` in: float32 for the 16-bit floats (their
    sums rounded once, at the end; eager fp16 ``nn.Linear`` is 10x more accurate so than fp16 sums), the
    dtype itself otherwise."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _widened(importer, value: relax.Var, dtype: str) -> relax.Var:
    """``value`` in ``dtype`` (a weight's cast is lifted out of the model and done once, at compile time)."""
    if str(value.ty.dtype) == dtype:
        return value
    return importer.block_builder.emit(relax.op.astype(value, dtype))


def convert_matmul(node: torch.fx.Node, importer) -> relax.Var:
    """``mm``/``bmm``/``matmul``(a, b) in the result's dtype, computed in ``_accumulator`` of it (16-bit
    operands widened first: their products are exact in float32, and float32 products take the float32
    schedule rules)."""
    dtype = _result_dtype(node)
    accumulator = _accumulator(dtype)
    a, b = (_widened(importer, importer.env[v], accumulator) for v in node.args[:2])
    product = importer.block_builder.emit(relax.op.linear_algebra.matmul(a, b, out_dtype=accumulator))
    return _widened(importer, product, dtype)


def convert_addmm(node: torch.fx.Node, importer) -> relax.Var:
    """``addmm(bias, a, b, beta=, alpha=)`` = beta * bias + alpha * (a @ b), in the result's dtype, computed
    in ``_accumulator`` of it."""
    dtype, emit = _result_dtype(node), importer.block_builder.emit
    accumulator = _accumulator(dtype)
    bias, a, b = (_widened(importer, importer.env[v], accumulator) for v in node.args[:3])
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    product = emit(relax.op.linear_algebra.matmul(a, b, out_dtype=accumulator))
    if alpha != 1:
        product = emit(relax.op.multiply(product, relax.const(alpha, accumulator)))
    if beta == 0:
        return _widened(importer, product, dtype)
    if beta != 1:
        bias = emit(relax.op.multiply(bias, relax.const(beta, accumulator)))
    return _widened(importer, emit(relax.op.add(bias, product)), dtype)


def convert_linear(node: torch.fx.Node, importer) -> relax.Var:
    """``linear(x, weight, bias=None)`` in the result's dtype, computed in ``_accumulator`` of it."""
    dtype = _result_dtype(node)
    accumulator = _accumulator(dtype)
    x, weight = (_widened(importer, importer.env[v], accumulator) for v in node.args[:2])
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = _widened(importer, importer.env[bias], accumulator) if bias is not None else None
    product = importer.block_builder.emit(relax.op.linear(x, weight, bias, accumulator))
    return _widened(importer, product, dtype)


def _reduced_dims(node: torch.fx.Node) -> tuple[list[int] | None, bool]:
    """(dims, keepdim) of ``amax(x, dim=[], keepdim=False)``;
    ``None`` dims for every dim."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = [dim] if isinstance(dim, int) else list(dim)
    return dims or None, bool(keepdim)


def extremum(reduce):
    """Converter of ``amax``/``amin``: the values only."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        dims, keepdim = _reduced_dims(node)
        return importer.block_builder.emit(reduce(importer.env[node.args[0]], dims, keepdim))

    return convert


def convert_embedding(node: torch.fx.Node, importer) -> relax.Var:
    """``embedding(weight, ids)`` as TVM's converter emits it (ids as int32, flattened, one ``take``,
    reshaped), but with the take's reads clamped (``mode="clip"``): TVM's default ``fast`` take reads
    outside the table for an id outside it (garbage, or a segfault for a large one). Ids the model gets
    as inputs are checked against the table at call time (``TensorSpec.values``); ids it computes
    (RoBERTa's positions past its maximum) read the last row instead of past it."""
    weight, ids = importer.env[node.args[0]], importer.env[node.args[1]]
    emit = importer.block_builder.emit
    shape = list(ids.ty.shape.values)
    flat = emit(relax.op.reshape(emit(relax.op.astype(ids, "int32")), shape=[-1]))
    rows = emit(relax.op.take(weight, flat, axis=0, mode="clip"))
    return emit(relax.op.reshape(rows, [*shape, weight.ty.shape.values[-1]]))


def _taken(importer, x, index, axis: int, negative: bool = True) -> relax.Var:
    """``take(x, index, axis)`` with torch's indices: a negative one counts from the end along a static
    axis (``negative``: ``x[idx]`` takes them, ``index_select`` does not), and reads are clamped to the
    axis (``mode="clip"``) where TVM's ``fast`` mode read past it. torch raises IndexError for an index
    out of range; a kernel cannot, so such an index reads the first or last slice instead of memory past
    the tensor (index inputs are checked at call time: ``TensorSpec.values``)."""
    emit = importer.block_builder.emit
    extent = x.ty.shape.values[axis]
    if negative and isinstance(extent, tvm.tirx.IntImm):
        dtype = str(index.ty.dtype)
        wrapped = emit(relax.op.add(index, relax.const(int(extent), dtype)))
        index = emit(relax.op.where(emit(relax.op.less(index, relax.const(0, dtype))), wrapped, index))
    return emit(relax.op.take(x, index, axis=axis, mode="clip"))


def convert_index(node: torch.fx.Node, importer) -> relax.Var:
    """``x[idx]`` with one index tensor (``aten.index.Tensor`` with one non-None index) through
    ``_taken``; several integer index tensors through ``_advanced_index``; a bool mask keeps TVM's
    converter, its result given torch's shape where TVM leaves it unknown (``shape_ops.with_torch_shape``)."""
    given = [(axis, index) for axis, index in enumerate(node.args[1]) if index is not None]
    if any(str(importer.env[index].ty.dtype) == "bool" for _, index in given):
        return with_torch_shape(node, importer, importer._index_tensor(node))
    if len(given) > 1:
        return _advanced_index(importer, importer.env[node.args[0]], [(a, importer.env[i]) for a, i in given])
    axis, index = given[0]
    return _taken(importer, importer.env[node.args[0]], importer.env[index], axis)


def _advanced_index(importer, x: relax.Var, given: list) -> relax.Var:
    """``x[..., i, j, ...]`` with integer index tensors ``(axis, index)`` at several axes, as torch
    indexes: the indices broadcast together to a shape S; the result has S in place of the indexed axes
    where they are adjacent, else first, before the axes not indexed (NumPy's advanced indexing).
    ``relax.op.index_tensor`` indexes leading axes only, so x is permuted to put the indexed axes first
    and the result permuted back. TVM's converter broadcast the aranges it puts in place of the
    ``None`` entries against each other (wrong shapes as soon as two axes are not indexed: ConvBERT's
    ``x[:, :, i, j]``)."""
    emit = importer.block_builder.emit
    rank = len(x.ty.shape.values)
    axes = [axis for axis, _ in given]
    rest = [axis for axis in range(rank) if axis not in axes]
    if axes + rest != list(range(rank)):
        x = emit(relax.op.permute_dims(x, axes + rest))
    taken = emit(relax.op.index_tensor(x, [index for _, index in given]))
    adjacent = axes == list(range(axes[0], axes[-1] + 1))
    if not adjacent or axes[0] == 0:
        return taken
    width = len(taken.ty.shape.values) - len(rest)  # rank of the broadcast index shape
    before = list(range(width, width + axes[0]))
    order = before + list(range(width)) + list(range(width + axes[0], len(taken.ty.shape.values)))
    return emit(relax.op.permute_dims(taken, order))


def convert_index_select(node: torch.fx.Node, importer) -> relax.Var:
    """``index_select(x, dim, index)`` through ``_taken``."""
    x = importer.env[node.args[0]]
    return _taken(importer, x, importer.env[node.args[2]], node.args[1] % len(x.ty.shape.values), negative=False)


def convert_div_mode(node: torch.fx.Node, importer) -> relax.Var:
    """``div(x, scalar, rounding_mode=...)`` with the scalar in the result's dtype: TVM's converter makes
    ``2`` an int32 constant, which a float tensor cannot be divided by (``float32 on the LHS ... int32 on
    the RHS``). A tensor divisor keeps TVM's converter."""
    x, divisor = node.args[0], node.args[1]
    if not isinstance(divisor, int | float) or isinstance(divisor, bool):
        return importer._div(node)
    dtype, emit = _result_dtype(node), importer.block_builder.emit
    x = importer.env[x]
    if str(x.ty.dtype) != dtype:
        x = emit(relax.op.astype(x, dtype))
    divisor = relax.const(divisor, dtype)
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
    if mode == "floor":
        return emit(relax.op.floor_divide(x, divisor))
    quotient = emit(relax.op.divide(x, divisor))
    return emit(relax.op.trunc(quotient)) if mode == "trunc" else quotient


def _tvm_binary(op, python_op):
    """TVM's converter of a binary op (``importer._binary_op``)."""
    return lambda node, importer: importer._binary_op(op, python_op)(node)


def convert_div_mode_exact(node: torch.fx.Node, importer) -> relax.Var:
    """``div(a, b, rounding_mode=...)``: a float floor division as torch's (``structfx.lowering.division``), the
    others through ``convert_div_mode``."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
    if mode == "floor":
        return FLOOR_DIVIDE(node, importer)
    return convert_div_mode(node, importer)


def convert_not_equal(node: torch.fx.Node, importer) -> relax.Var:
    """``a != b``, true where a float operand is NaN as torch's: TVM's ``not_equal`` lowers to LLVM's ordered
    compare (false there), and its simplifier turns ``not (a == b)`` back into it."""
    emit = importer.block_builder.emit
    unequal = importer._binary_op(relax.op.not_equal, operator.ne)(node)
    for operand in node.args[:2]:
        if isinstance(operand, torch.fx.Node) and operand.meta["val"].dtype.is_floating_point:
            value = importer.env[operand]
            if str(value.ty.dtype) == "bfloat16":  # TVM has no bfloat16 isnan; the widening is exact
                value = emit(relax.op.astype(value, "float32"))
            unequal = emit(relax.op.logical_or(unequal, emit(relax.op.isnan(value))))
    return unequal


def classification(op):
    """Converter of ``isnan``/``isinf``/``isfinite`` by the Relax ``op``, a bfloat16 input widened to float32 first
    (exact; TVM has none of them for bfloat16: "Data type T.bfloat16 not supported for isnan op")."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        x, emit = importer.env[node.args[0]], importer.block_builder.emit
        if str(x.ty.dtype) == "bfloat16":
            x = emit(relax.op.astype(x, "float32"))
        return emit(op(x))

    return convert


def convert_cumsum(node: torch.fx.Node, importer) -> relax.Var:
    """``cumsum`` as TVM's, with a zero sum made ``0.0``: torch's sums start from ``0.0`` (``0.0 + -0.0`` is
    ``0.0``, so none of its sums is ``-0.0``); TVM's start from the first element (``cumsum([-0.0])`` was -0.0)."""
    total = importer._cumsum(node)
    dtype = str(total.ty.dtype)
    if "float" not in dtype:
        return total
    emit, zero = importer.block_builder.emit, relax.const(0.0, dtype)
    return emit(relax.op.where(emit(relax.op.equal(total, zero)), zero, total))


FLOOR_DIVIDE = division.converter(division.floor_divide, "floor_divide", convert_div_mode)
FMOD = division.converter(division.fmod, "fmod", lambda node, importer: importer._fmod(node))
REMAINDER = division.converter(division.remainder, "remainder", _tvm_binary(relax.op.floor_mod, operator.mod))


def float32_only(name: str):
    """TVM's converter of ``name`` where the node computes in float32, a StructfxError otherwise."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        dtype = _result_dtype(node)
        if dtype != "float32":
            raise StructfxError(
                f"[import] {node.format_node()}: TVM's converter of aten.{name} computes in float32 only and the "
                f"model computes it in {dtype}; compile model.float() with float32 inputs"
            )
        return getattr(importer, "_" + name.split(".")[0])(node)

    return convert


FLOAT32_ONLY = ("convolution.default", "conv1d.default", "conv2d.default", "conv3d.default",
                "conv_transpose1d.default", "conv_transpose2d.input", "baddbmm.default")

CONVERTERS = {
    **{name: float32_only(name) for name in FLOAT32_ONLY},
    "slice.Tensor": convert_slice,
    "mm.default": convert_matmul,
    "bmm.default": convert_matmul,
    "matmul.default": convert_matmul,
    "addmm.default": convert_addmm,
    "linear.default": convert_linear,
    "embedding.default": convert_embedding,
    "index.Tensor": convert_index,
    "index_select.default": convert_index_select,
    "div.Tensor_mode": convert_div_mode_exact,
    "div.Scalar_mode": convert_div_mode_exact,
    "floor_divide.default": division.converter(division.floor_divide, "floor_divide",
                                               _tvm_binary(relax.op.floor_divide, operator.floordiv)),
    "fmod.Tensor": FMOD,
    "fmod.Scalar": FMOD,
    "remainder.Tensor": REMAINDER,
    "remainder.Scalar": REMAINDER,
    "isnan.default": classification(relax.op.isnan),
    "isinf.default": classification(relax.op.isinf),
    "cumsum.default": convert_cumsum,
    "ne.Tensor": convert_not_equal,
    "ne.Scalar": convert_not_equal,
    "amax.default": extremum(relax.op.max),
    "amin.default": extremum(relax.op.min),
    **ORDERING_CONVERTERS,
    **SHAPE_CONVERTERS,
    **UNARY_CONVERTERS,
    **SYMBOLIC_SCALAR_CONVERTERS,
}
