"""Batched matmuls (attention's Q K^T and P V) as one kernel each that reads its operands through the
layout ops before it and writes its result through the ones after it.

torch.export spells multi-head attention as: project, ``reshape`` to (batch, seq, heads, head_dim),
``permute_dims`` to (batch, heads, seq, head_dim), for K another ``permute_dims`` (K^T), a multiply by
a scale, a ``reshape`` merging batch and heads, ``matmul``, a ``reshape`` splitting them again; after
P V, ``permute_dims`` back to (batch, seq, heads, head_dim). Lowered op by op, every permute is a copy
of a whole tensor (K^T's a scalar, strided one) and the matmul's schedule sees only the copies.

Here each float32 batched ``matmul`` (one operand of rank 3 or more, the other of rank 2 or more: a
weight shared by the batch as well) becomes one ``call_tir`` of a
TE kernel whose iteration space is the layout after the matmul's single-use chain of ``permute_dims``
and batch-splitting ``reshape`` consumers, and whose reads index the tensors before its operands'
chains of ``permute_dims``, ``reshape`` and multiplications by scalar constants, as far back as every
index stays a plain loop variable (the scalar factors become one multiply of the result). So Q, K and
V are read in the projection's (batch, seq, heads, head_dim) layout and P V's result is written in
(batch, seq, heads, head_dim) order, ready for the output projection. Both products run on the matmul
rule's outer-product kernel, vectorised over the output's columns: P V reads V's rows as they are; Q K^T
reads K through a "panel", a copy of K^T in (batch, heads, head_dim, keys) order that the rule computes
one column tile (head_dim x NR keys) at a time inside its parallel loop, so it stays in cache and is
made once per tile, not per row. (A dot product along head_dim instead needs a sum across the vector
lanes per output: at head_dim 64 those sums cost as much as the products, and with a symbolic sequence
length that kernel ran 3 to 10x slower than torch.)

The row and column extents are rounded up to the matmul rule's register tile (``Matmul.tile``), the
reads clamped to the last real row or column (never stored, as ``packing.dense_packed`` does): a
symbolic sequence length needs neither a tail loop nor a padded copy of an operand. The kernel is marked
fusible with the elementwise ops after it (the attention mask add, T5's position bias).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

from structfx.lowering.compat import Target, relax, te, tirx, tvm
from structfx.lowering.lifting import fusible_with_epilogue
from structfx.lowering.ops.common import tile_multiple, vector_lanes
from structfx.lowering.schedule_rules.matmul import Matmul

#: Name of the kernel (its PrimFunc, before fusion adds the names of the ops fused after it).
KERNEL = "batched_matmul"


@dataclass(frozen=True)
class Step:
    """One layout op between a tensor and what it was made from: ``source`` (the op's input), ``index``
    (the op's output coordinates -> its input coordinates) and ``scale`` (a scalar factor, 1.0 if none)."""

    source: relax.Expr
    index: object
    scale: float = 1.0


def fold_batched_matmuls(mod, target: Target):
    """``mod`` with every batched float32 matmul in its Relax functions as one
    ``batched_matmul`` kernel over its operands' and result's layout chains (see the module docstring)."""
    lanes = vector_lanes(target)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        plans = _plans(func, lanes, Matmul.tile)
        if plans:
            rewriter = _Rewriter(mod, plans)
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
            mod = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    return mod


@dataclass
class _Plan:
    """What one kernel computes: out[domain] = scale * sum_k a[a_index(domain, k)] * b[b_index(domain, k)]."""

    a: relax.Expr
    b: relax.Expr
    a_shape: list  # their shapes (Relax's sizes)
    b_shape: list
    shape: list  # the domain (the last consumer's shape)
    a_index: object  # (domain vars, k) -> plain indices of a
    b_index: object
    rows: int  # position of the matmul's i in the domain
    columns: int  # position of j
    k_extent: object
    scale: float
    tile: tuple  # (MR, NR) the rows and columns are padded to
    panel: bool  # B is read through a (.., K, N) copy, its columns contiguous (B is not stored so)


def _plans(func, lanes: int, tile_of) -> dict:
    """{var bound to the matmul's last folded consumer: _Plan} for every matmul of ``func`` to rewrite."""
    values, users = {}, {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                values[binding.var] = binding.value
            for var in relax.analysis.free_vars(binding.value):
                users.setdefault(var, []).append(binding.var)
    for var in relax.analysis.free_vars(func.body.body):
        users.setdefault(var, []).append(None)
    plans = {}
    for var, value in values.items():
        if _is_op(value, "relax.matmul") and _eligible(value):
            found = _plan(var, value, values, users, lanes, tile_of)
            if found is not None:
                plans[found[0]] = found[1]
    return plans


def _eligible(call) -> bool:
    a, b = call.args
    dims = [a.ty.ndim, b.ty.ndim]
    dtypes = {str(a.ty.dtype), str(b.ty.dtype), str(call.attrs.out_dtype) or "float32"}
    return min(dims) >= 2 and max(dims) >= 3 and dtypes == {"float32"} and all(
        t.ty.shape is not None for t in (a, b, call))


def _plan(var, call, values, users, lanes, tile_of):
    """(the var to rebind, its _Plan) for one matmul, folding as many consumers as keep every operand
    index plain; None where not even the unfolded matmul has plain indices."""
    chain = _consumer_chain(var, values, users)
    for length in range(len(chain), -1, -1):
        end = chain[length - 1] if length else var
        plan = _plan_for(call, chain[:length], end, values, lanes, tile_of)
        if plan is not None:
            return end, plan
    return None


def _consumer_chain(var, values, users) -> list:
    """The vars of the single-use chain of permute_dims and reshape ops that starts at ``var``."""
    chain = []
    while len(users.get(var, [])) == 1 and users[var][0] is not None:
        consumer = users[var][0]
        value = values.get(consumer)
        if value is None or not (_is_op(value, "relax.permute_dims") or _is_op(value, "relax.reshape")):
            break
        chain.append(consumer)
        var = consumer
    return chain


def _plan_for(call, chain, end, values, lanes, tile_of):
    shape = list(end.ty.shape)
    domain = [tirx.Var(f"d{n}", "int64") for n in range(len(shape))]
    analyzer = _analyzer(domain, shape)
    coords = list(domain)
    for consumer in reversed(chain):
        step = _step(values[consumer])
        if step is None:
            return None
        coords = [analyzer.simplify(c) for c in step.index(coords)]
    out_shape = list(call.ty.shape)
    i_var, j_var = coords[-2], coords[-1]
    if not (isinstance(i_var, tirx.Var) and isinstance(j_var, tirx.Var)) or i_var.same_as(j_var):
        return None
    rows, columns = _position(i_var, domain), _position(j_var, domain)
    a, b = call.args
    k_extent = list(a.ty.shape)[-1]
    k = tirx.Var("k", "int64")
    if not (isinstance(k_extent, tirx.IntImm) and k_extent.value == 1):
        analyzer.bind(k, tvm.ir.Range(0, k_extent))
    if columns != len(domain) - 1:
        return None  # the kernel stores its output in rows along the matmul's columns
    a_coords = _broadcast(coords[:-2], out_shape, list(a.ty.shape)) + [i_var, k]
    b_coords = _broadcast(coords[:-2], out_shape, list(b.ty.shape)) + [k, j_var]
    a_view = _deepest_view(a, a_coords, values, analyzer, domain + [k])
    b_view = _deepest_view(b, b_coords, values, analyzer, domain + [k])
    if a_view is None or b_view is None:
        return None
    m, n = shape[rows], shape[columns]
    return _Plan(
        a_view[0], b_view[0], list(a_view[0].ty.shape), list(b_view[0].ty.shape), shape,
        _indexer(a_view[1], domain, k), _indexer(b_view[1], domain, k),
        rows, columns, k_extent, a_view[2] * b_view[2], tile_of(False, lanes, m, n),
        panel=not b_view[1][-1].same_as(j_var),
    )


def _deepest_view(operand, coords, values, analyzer, variables):
    """(source, its plain indices, scale) for the tensor furthest back along ``operand``'s chain of layout
    ops (``operand`` itself included) that is read at plain indices where ``operand`` is read at
    ``coords``; None where not even ``operand`` is."""
    found = None
    scale = 1.0
    while True:
        if all(_is_plain(c, variables) for c in coords):
            found = (operand, coords, scale)
        value = values.get(operand) if isinstance(operand, relax.Var) else None
        step = _step(value) if value is not None else None
        if step is None or str(step.source.ty.dtype) != "float32":
            return found
        coords = [analyzer.simplify(c) for c in step.index(coords)]
        operand, scale = step.source, scale * step.scale


def _indexer(indices, domain, k):
    """A function of (kernel domain indices, k) that gives ``indices`` (plain: each one of ``domain``, ``k`` or 0)."""

    variables = [*domain, k]

    def index(new_domain, new_k):
        values = [*new_domain, new_k]
        return [i if isinstance(i, tirx.IntImm) else values[_position(i, variables)] for i in indices]

    return index


def _broadcast(batch, out_shape, shape) -> list:
    """The batch coordinates of an operand of ``shape`` broadcast to the matmul's ``out_shape``."""
    own = list(shape[:-2])
    offset = len(out_shape) - 2 - len(own)
    analyzer = tvm.sym.Analyzer()
    coords = []
    for n, extent in enumerate(own):
        broadcast = analyzer.can_prove_equal(extent, 1) and not analyzer.can_prove_equal(out_shape[n + offset], 1)
        coords.append(tirx.const(0, "int64") if broadcast else batch[n + offset])
    return coords


def _step(call) -> Step | None:
    """The layout op ``call`` as a Step, or None where it is not one this rewrite folds."""
    if _is_op(call, "relax.permute_dims"):
        x = call.args[0]
        axes = call.attrs.axes
        axes = list(range(x.ty.ndim))[::-1] if axes is None else [int(a) for a in axes]

        def permuted(coords):
            source = [None] * len(axes)
            for n, axis in enumerate(axes):
                source[axis] = coords[n]
            return source

        return Step(x, permuted)
    if _is_op(call, "relax.reshape"):
        x = call.args[0]
        if x.ty.shape is None or call.ty.shape is None:
            return None
        groups = _reshape_groups(list(x.ty.shape), list(call.ty.shape))
        return None if groups is None else Step(x, functools.partial(_unreshape, groups))
    if _is_op(call, "relax.multiply") or _is_op(call, "relax.divide"):
        for n, arg in enumerate(call.args):
            factor = _scalar(arg)
            other = call.args[1 - n]
            if factor is None or (n == 0 and _is_op(call, "relax.divide")):
                continue
            if not _same_shape(other, call):
                return None
            return Step(other, list, factor if _is_op(call, "relax.multiply") else 1.0 / factor)
    return None


def _reshape_groups(source: list, shape: list):
    """[(source extents, output extents)] pairing runs of dims of equal size, each run one dim on at least one
    side; None where a reshape regroups otherwise."""
    analyzer = tvm.sym.Analyzer()
    groups, s, t = [], 0, 0
    while s < len(source) and t < len(shape):
        for take_s, take_t in _runs(len(source) - s, len(shape) - t):
            a, b = source[s:s + take_s], shape[t:t + take_t]
            if analyzer.can_prove_equal(_product(a), _product(b)):
                groups.append((a, b))
                s, t = s + take_s, t + take_t
                break
        else:
            return None
    if s != len(source) or t != len(shape):
        return None
    return groups


def _runs(left_s: int, left_t: int):
    yield 1, 1
    for n in range(2, max(left_s, left_t) + 1):
        if n <= left_t:
            yield 1, n
        if n <= left_s:
            yield n, 1


def _unreshape(groups, coords) -> list:
    """Coordinates of a reshape's input from those of its output."""
    source, position = [], 0
    for extents_in, extents_out in groups:
        own = coords[position:position + len(extents_out)]
        position += len(extents_out)
        flat = own[0]
        for extent, c in zip(extents_out[1:], own[1:]):
            flat = flat * extent + c
        split = []
        for extent in reversed(extents_in[1:]):
            split.append(tirx.floormod(flat, extent))
            flat = tirx.floordiv(flat, extent)
        source.extend([flat, *reversed(split)])
    return source


def _product(extents):
    return functools.reduce(operator.mul, extents, tirx.const(1, "int64"))


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.Constant) and str(expr.ty.dtype) == "float32":
        data = expr.value.numpy()
        if data.size == 1:
            return float(data.reshape(()))
    return None


def _same_shape(x, call) -> bool:
    analyzer = tvm.sym.Analyzer()
    if x.ty.shape is None or call.ty.shape is None:
        return False
    a, b = list(x.ty.shape), list(call.ty.shape)
    return len(a) == len(b) and all(analyzer.can_prove_equal(p, q) for p, q in zip(a, b))


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _is_plain(expr, variables) -> bool:
    return (isinstance(expr, tirx.IntImm) and expr.value == 0) or any(expr.same_as(v) for v in variables)


def _position(var, domain) -> int:
    return next(n for n, v in enumerate(domain) if v.same_as(var))


def _analyzer(domain, shape):
    analyzer = tvm.sym.Analyzer()
    for var, extent in zip(domain, shape):
        if not (isinstance(extent, tirx.IntImm) and extent.value == 1):  # a var of one value would become 0
            analyzer.bind(var, tvm.ir.Range(0, extent))
    return analyzer


def batched_matmul(*tensors: te.Tensor, plan: _Plan) -> te.Tensor:
    """The kernel of ``plan`` on its operands' sources (one tensor where both read the same): an
    accumulation over the domain with rows and columns rounded up to the tile (reads clamped to the last
    real row and column), then the domain's values, scaled. float32. Where B is not stored along the
    columns (``plan.panel``: Q K^T reads K along head_dim), B is read through a copy in (batch.., K, N)
    order, which the matmul rule computes one column tile at a time (a K x NR panel, in cache)."""
    a, b = tensors[0], tensors[-1]
    # the function's sizes are those of its inputs (call_te gives them vars of their own)
    own = tvm.sym.Analyzer()
    for source_shape, tensor in ((plan.a_shape, a), (plan.b_shape, b)):
        for extent, te_extent in zip(source_shape, tensor.shape):
            if isinstance(extent, tirx.Var):
                own.bind(extent, te_extent)
    mr, nr = plan.tile
    shape = [own.simplify(e) for e in plan.shape]
    m, n = shape[plan.rows], shape[plan.columns]
    padded = list(shape)
    padded[plan.rows], padded[plan.columns] = _rounded(m, mr), _rounded(n, nr)
    k_extent = own.simplify(plan.k_extent)
    k = te.reduce_axis((0, k_extent), name="k")

    def clamp(domain):
        clamped = list(domain)
        for position, extent in ((plan.rows, m), (plan.columns, n)):
            if not padded[position].same_as(extent):
                clamped[position] = tirx.min(domain[position], extent - 1)
        return clamped

    batch = [p for p in range(len(shape)) if p not in (plan.rows, plan.columns)]

    def b_transposed(*index):  # (batch.., k, column) -> B's element
        domain = [tirx.const(0, "int64")] * len(shape)  # B does not depend on the row
        for position, value in zip(batch, index[:-2]):
            domain[position] = value
        domain[plan.columns] = index[-1]
        return b(*plan.b_index(clamp(domain), index[-2]))

    panel = te.compute([padded[p] for p in batch] + [k_extent, padded[plan.columns]], b_transposed,
                       name=f"{KERNEL}_panel") if plan.panel else None

    def read_b(domain):
        if panel is None:
            return b(*plan.b_index(clamp(domain), k))
        return panel(*[domain[p] for p in batch], k, domain[plan.columns])

    def accumulate(*domain):
        return te.sum(a(*plan.a_index(clamp(domain), k)) * read_b(domain), axis=k)

    acc = te.compute(padded, accumulate, name=f"{KERNEL}_accumulate")
    scale = tirx.const(plan.scale, "float32")
    if plan.scale == 1.0:
        return te.compute(shape, lambda *d: acc(*d), name=KERNEL)
    return te.compute(shape, lambda *d: acc(*d) * scale, name=KERNEL)


def _rounded(extent, tile: int):
    if isinstance(extent, tirx.IntImm) and extent.value % tile == 0:
        return extent
    return tile_multiple(extent, tile)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Each planned consumer var bound to its kernel's call instead."""

    def __init__(self, mod, plans: dict) -> None:
        super().__init__(mod)
        self.plans = plans

    def visit_var_binding_(self, binding) -> None:
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        sources = [plan.a] if plan.a.same_as(plan.b) else [plan.a, plan.b]
        args = [self.visit_expr(s) for s in sources]
        call = fusible_with_epilogue(self.builder_, self.builder_.call_te(
            functools.partial(batched_matmul, plan=plan), *args, primfunc_name_hint=KERNEL,
        ))
        new = self.builder_.emit(call) if isinstance(binding.var, relax.DataflowVar) else \
            self.builder_.emit_output(call)
        self.set_var_remap(binding.var, new)
