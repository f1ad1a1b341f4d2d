"""Attention's "safe" softmax as one row kernel.

``torch.nn.functional.scaled_dot_product_attention`` (what Hugging Face's attention calls) exports its
softmax as ATen's ``_safe_softmax``, decomposed (``torch/_decomp/decompositions.py``) to::

    out = softmax(x, dim); masked_rows = all(x == -inf, dim, keepdim=True)
    where(masked_rows, zeros_like(out), out)

so a row of keys all masked gives zeros instead of NaN. TVM imports ``all`` as ``not max(int8(not (x ==
-inf)))``: a reduction of its own over the scores, which FuseOps cannot join to the softmax (two
reductions), so the scores were read by two kernels and the guard written out between them. Softmax's
own sum tells the guard (``safe_softmax``): one kernel, which the RowReduction rule schedules
(``schedule_rules/reduction.py``).

``fuse_safe_softmax`` replaces each such ``where`` over the last axis of a float32 softmax by that kernel;
the guard's ops are left dead (dead code elimination drops them). Any other form stays as it is.
"""

from __future__ import annotations

from structfx.lowering.compat import relax, te, tirx, topi, tvm


def safe_softmax(x: te.Tensor) -> te.Tensor:
    """Softmax of ``x`` (float32, any shape, symbolic sizes allowed) over its last axis, 0 where a row
    is all ``-inf``. The exponential is TVM's ``fast_exp`` as in ``topi.nn.fast_softmax`` (the softmax
    legalization on the CPU, ``structfx.lowering.fast_math``).

    A row is all ``-inf`` exactly where its sum of ``exp(x - max)`` is 0: elsewhere its maximum element
    adds ``exp(0) = 1`` (``te.max`` starts from the lowest finite float, so the maximum of a row of
    ``-inf`` is that float, ``x - max`` is ``-inf`` and every term is 0; ``fast_exp`` gives 0 there too,
    its exponent field underflows to 0). A row with a NaN has a NaN sum and gives NaN, as torch.
    A row at the lowest float (masks of ``torch.finfo(float32).min``) is not all ``-inf``: uniform, as
    torch."""
    *rows, length = x.shape
    k = te.reduce_axis((0, length), name="k")
    maxelem = te.compute(rows, lambda *r: te.max(x(*r, k), axis=k), name="T_softmax_maxelem")
    delta = te.compute(x.shape, lambda *i: x(*i) - maxelem(*i[:-1]), name="T_softmax_delta")
    exp = topi.math.fast_exp(delta)
    j = te.reduce_axis((0, length), name="j")
    expsum = te.compute(rows, lambda *r: te.sum(exp(*r, j), axis=j), name="T_softmax_expsum")
    zero = tirx.const(0.0, "float32")
    return te.compute(
        x.shape,
        lambda *i: tirx.Select(expsum(*i[:-1]) == zero, zero, exp(*i) / expsum(*i[:-1])),
        name="T_safe_softmax",
    )


@relax.expr_functor.mutator
class _SafeSoftmax(relax.PyExprMutator):
    """See the module docstring."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        x = self._guarded_softmax(call)
        if x is None:
            return call
        return self.builder_.call_te(safe_softmax, x, primfunc_name_hint="safe_softmax")

    def _guarded_softmax(self, call: relax.Call):
        """The scores ``x`` where ``call`` is ``where(all(x == -inf, -1, keepdim), 0, softmax(x, -1))`` on
        float32 (as TVM imports it), else None."""
        if not _is_op(call, "where"):
            return None
        guard, zeros, soft = (self._value(arg) for arg in call.args)
        if not (_is_op(soft, "nn.softmax") and _is_op(zeros, "full_like") and _is_scalar(zeros.args[1], 0.0)):
            return None
        x = soft.args[0]
        ndim = x.ty.ndim if isinstance(x.ty, relax.TensorType) else -1
        if x.ty.dtype != "float32" or int(soft.attrs.axis) not in (-1, ndim - 1):
            return None
        chain = [guard]
        for op in ("logical_not", "astype", "max", "astype", "logical_not", "equal"):
            if not _is_op(chain[-1], op):
                return None
            chain.append(self._value(chain[-1].args[0]))
        reduce, equal = chain[2], chain[5]
        axes = [int(a) for a in reduce.attrs.axis] if reduce.attrs.axis is not None else []
        if axes not in ([-1], [ndim - 1]) or not reduce.attrs.keepdims:
            return None
        if not (equal.args[0].same_as(x) and _is_scalar(equal.args[1], float("-inf"))):
            return None
        return x

    def _value(self, expr):
        """The call ``expr`` is bound to (or ``expr`` itself)."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return bound if bound is not None else expr
        return expr


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get(f"relax.{name}"))


def _is_scalar(expr, value: float) -> bool:
    if not isinstance(expr, tvm.ir.expr.Constant) or expr.value.numpy().size != 1:
        return False
    return float(expr.value.numpy().reshape(())) == value


def fuse_safe_softmax(mod):
    """``mod`` with each guarded softmax of its ``main`` (see the module docstring) one ``safe_softmax`` kernel."""
    main = mod.get_global_var("main")
    mutator = _SafeSoftmax(mod)
    mutator.builder_.update_func(main, mutator.visit_expr(mod["main"]))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())
