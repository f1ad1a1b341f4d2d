"""Converters that stand in for TVM's own where its importer loses what torch.export proved.

- ``aten.slice.Tensor`` with a symbolic end (``position_ids[:, :seq]`` in BERT-like embeddings):
  TVM emits a strided_slice of extent ``min(seq, 512)``, since it does not know ``seq <= 512``, and the
  shapes downstream become unknown (then our converters, and broadcasting, have no shape to work
  with). Where torch's own output size is exactly ``end - start`` (it proved the slice in bounds), the
  slice is emitted with ``assume_inbound=True``, so its extent is ``end - start``.
"""

from __future__ import annotations

import sympy
import torch

from structfx.lowering.compat import relax, tvm

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


CONVERTERS = {"slice.Tensor": convert_slice}
