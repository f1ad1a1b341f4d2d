"""Arithmetic between a tensor and a symbolic size (``h.sum(1) / h.shape[1]``, ``x * x.size(0)``): torch
promotes the size (an int) to the tensor's dtype; TVM's converter passes the size on as an int64 PrimExpr
and refuses the mixed dtypes at import ("Binary operators must have the same datatype"). Here the size is
cast to the tensor's float dtype first, as torch's type promotion does for an int scalar."""

from __future__ import annotations

import operator

import torch

from structfx.lowering.compat import relax, tvm


def _is_symbolic_int(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.SymInt)


def binary_with_sizes(relax_op, python_op):
    """Converter of ``aten.<op>.Tensor``: TVM's own unless an operand is a symbolic int and the other a
    float tensor; then that int, cast to the tensor's dtype, is the operand."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        lhs, rhs = node.args[:2]
        tensor = lhs if not _is_symbolic_int(lhs) else rhs
        val = tensor.meta.get("val") if isinstance(tensor, torch.fx.Node) else None
        if not (_is_symbolic_int(lhs) or _is_symbolic_int(rhs)) or not isinstance(val, torch.Tensor) or (
                not val.dtype.is_floating_point):
            return importer._binary_op(relax_op, python_op)(node)
        dtype = str(importer.env[tensor].ty.dtype)

        def operand(arg):
            if not _is_symbolic_int(arg):
                return importer.env[arg]
            return relax.prim_value(tvm.tirx.Cast(dtype, importer.env[arg]))

        return importer.block_builder.emit(relax_op(operand(lhs), operand(rhs)))

    return convert


CONVERTERS = {
    "add.Tensor": binary_with_sizes(relax.op.add, operator.add),
    "sub.Tensor": binary_with_sizes(relax.op.subtract, operator.sub),
    "mul.Tensor": binary_with_sizes(relax.op.multiply, operator.mul),
    "div.Tensor": binary_with_sizes(relax.op.divide, operator.truediv),
}
