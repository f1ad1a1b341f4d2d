"""Dense layers on flattened rows (``b * s``) with their elementwise neighbours on one plain rows var.

A linear layer on a (batch, seq, K) input is exported as ``reshape`` to (b * s, K), the dense kernel,
``reshape`` back to (b, s, N); the activation, residual add or scale that follows works on (b, s, N).
The packed dense kernel (``structfx.lowering.packing``) needs its rows as one plain var: FuseTIR needs
one buffer shape per Relax var, and the schedule's reverse_compute_at cannot prove that the padded row
tiles cover a compound extent. So each ``dense_packed`` call on compound rows gets its input bound to
a plain ``rows`` var by a ``match_cast`` (one var per compound extent, so the outputs of layers on the
same rows still combine: a gated MLP's ``gate(x) * up(x)``), and its result is (rows, N).

Around those kernels, ``plain_rows`` keeps every tensor that is only a reshape of a (rows, N) result
a *view* and moves elementwise work onto the rows:

- A reshape of a (rows, N) tensor reads it through a ``match_cast`` back to (b * s, N): its TIR is then a
  plain copy Relax recognises as a view (``RewriteDataflowReshape``, run at the end of legalization while
  the copy is still unscheduled, makes it ``vm.builtin.reshape``, no kernel); on (rows, N) directly, TVM
  indexes it ``% rows`` and it stays a copy kernel.
- An elementwise op (activation, bias or residual add, scale) on reshapes of (rows, N) tensors runs on the
  (rows, N) tensors themselves, the result reshaped (a view) afterwards: FuseOps then fuses it into the
  dense kernel's epilogue (a reshape between them would stop the fusion). Its other full-size operands
  are reshaped to (rows, N) the same way (views).
- A dense layer whose input is such a reshape reads the (rows, K) tensor directly.

Done last before legalization (``structfx.lowering.fusion``): Relax's binding canonicalisation (in
LiftTransformParams, in ``rewrite_call``) substitutes a match_cast var by its value.
"""

from __future__ import annotations

from structfx.lowering.compat import relax, tirx, tvm
from structfx.lowering.packing import KERNEL, kernel_call

#: Elementwise Relax ops that run on the rows form of their operands (their result is reshaped back).
ELEMENTWISE = frozenset(f"relax.{name}" for name in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power",
    "exp", "erf", "tanh", "sigmoid", "sqrt", "rsqrt", "negative", "abs", "square", "clip", "astype",
    "nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu",
))


@relax.expr_functor.mutator
class _PlainRows(relax.PyExprMutator):
    """See the module docstring."""

    def __init__(self, mod, func: relax.Function) -> None:
        super().__init__(mod)
        self.plain: list[tuple] = []  # (compound extent, its var)
        self.analyzer = tvm.sym.Analyzer()
        self.bound: dict = {}  # each call of ``func`` -> the var it is bound to
        self.value: dict = {}  # and back
        self.users: dict = {}  # each var of ``func`` -> the vars of the bindings using it
        for block in func.body.blocks:
            for binding in block.bindings:
                self.bound[binding.value], self.value[binding.var] = binding.var, binding.value
                for var in relax.analysis.free_vars(binding.value):
                    self.users.setdefault(var, []).append(binding.var)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        original = call
        call = super().visit_call_(call)
        if call.op.same_as(tvm.ir.Op.get("relax.call_tir")) and call.args[0].name_hint.startswith(KERNEL):
            return self._dense(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.reshape":
            return self._reshape(call)
        if call.op.name in ELEMENTWISE and self._extends_its_producer(original, call):
            return self._elementwise(call)
        return call

    def _dense(self, call: relax.Call) -> relax.Expr:
        x, packed = call.args[1].fields[:2]  # then the symbolic vars call_te passes for compound rows
        rows, k = x.ty.shape
        if isinstance(rows, (tirx.IntImm, tirx.Var)):
            return call
        var = self._plain_var(rows)
        source = self._rows_source(x)
        if source is None or not source.ty.shape[0].same_as(var):
            source = self.builder_.match_cast(x, relax.TensorType([var, k], "float32"))
        return kernel_call(self.builder_, source, packed, int(call.ty.shape[1]))

    def _reshape(self, call: relax.Call) -> relax.Expr:
        source = self._rows_source(call.args[0])
        if source is None:
            return call
        return self._from_rows(source, call.ty.shape)

    def _elementwise(self, call: relax.Call) -> relax.Expr:
        """``call`` on the rows form of its operands, reshaped back; ``call`` as it is where some operand
        has no rows form (it neither is the result's shape nor broadcasts along the last dim alone)."""
        shape = call.ty.shape if isinstance(call.ty, relax.TensorType) else None
        if shape is None or self.is_rows(call):
            return call
        operands = [a for a in call.args if isinstance(a.ty, relax.TensorType)]
        sources = [self._rows_source(a) for a in operands if self._same_shape(a.ty.shape, shape)]
        form = next((s for s in sources if s is not None), None)
        if form is None:
            return call
        rows, n = form.ty.shape
        args = []
        for arg in call.args:
            if not isinstance(arg.ty, relax.TensorType):
                args.append(arg)
            elif self._same_shape(arg.ty.shape, shape):
                args.append(self._to_rows(arg, rows, n))
            elif arg.ty.ndim == 0 or (arg.ty.ndim == 1 and self._same_shape([n], list(shape)[-1:])
                                      and self._same_shape(arg.ty.shape, [n])):
                args.append(arg)
            else:
                return call
        result = self.builder_.emit(relax.Call(call.op, args, call.attrs))
        return self._from_rows(result, shape)

    def _extends_its_producer(self, original: relax.Call, call: relax.Call) -> bool:
        """Whether every operand on rows of ``original`` (the call as ``func`` has it; ``call`` with its
        operands rewritten) has no other users but ones feeding it or fed by it (``x * sigmoid(x)``):
        moved onto the rows, it then joins its producers' fused kernel without making an operand a
        second output of it (the dense schedule rule takes single-output kernels only). A residual
        stream ``h`` read by an RMS norm's ``h * h`` and by the next residual add stays on (b, s, N)."""
        var = self.bound.get(original)
        if var is None:
            return False
        operands = [a for a in original.args if isinstance(a, relax.Var)]
        on_rows = [o for o, r in zip(original.args, call.args)
                   if isinstance(o, relax.Var) and self._rows_source(r) is not None]
        return bool(on_rows) and all(
            any(u.same_as(o) for o in operands) or any(var.same_as(f) for f in self._operands_of(u))
            for operand in on_rows for u in self.users.get(operand, []) if not u.same_as(var)
        )

    def _operands_of(self, var) -> list:
        value = self.value.get(var)
        return list(value.args) if isinstance(value, relax.Call) else []

    def _plain_var(self, compound):
        var = next((v for e, v in self.plain if self.analyzer.can_prove_equal(e, compound)), None)
        if var is None:
            var = tirx.Var("rows", "int64")
            self.plain.append((compound, var))
        return var

    def compound(self, var):
        return next(e for e, v in self.plain if v.same_as(var))

    def is_rows(self, value) -> bool:
        """Whether ``value`` is a (rows, N) tensor on one of the plain rows vars."""
        ty = value.ty
        return (isinstance(ty, relax.TensorType) and ty.ndim == 2 and ty.shape is not None
                and any(v.same_as(ty.shape[0]) for _, v in self.plain))

    def _rows_source(self, value):
        """The (rows, N) tensor ``value`` is a reshape (or match_cast) of, or None."""
        while value is not None and not self.is_rows(value):
            if not isinstance(value, relax.Var):
                return None
            bound = self.lookup_binding(value)
            if not isinstance(bound, relax.Call) or not bound.op.same_as(tvm.ir.Op.get("relax.reshape")):
                return None
            value = bound.args[0]
        return value

    def _to_rows(self, value, rows, n):
        """``value`` (any shape of rows * N elements) as (rows, N): its rows source where it has one of that
        shape, else a reshape to (compound, N) and a match_cast."""
        source = self._rows_source(value)
        if source is not None and self._same_shape(source.ty.shape, [rows, n]):
            return source
        flat = self.builder_.emit(relax.op.reshape(value, [self.compound(rows), n]))
        return self.builder_.match_cast(flat, relax.TensorType([rows, n], value.ty.dtype))

    def _from_rows(self, source, shape) -> relax.Expr:
        return relax.op.reshape(source, shape)

    def _same_shape(self, a, b) -> bool:
        a, b = list(a), list(b)
        return len(a) == len(b) and all(self.analyzer.can_prove_equal(x, y) for x, y in zip(a, b))


@relax.expr_functor.mutator
class _ViewReshapes(relax.PyExprMutator):
    """Each reshape of a (rows, N) tensor reading it through a match_cast to (compound, N). Run after
    dead code elimination: a match_cast binding is never dead (it checks a shape), and one on an
    epilogue's intermediate result would keep it a second output of the fused kernel."""

    def __init__(self, mod, rows: _PlainRows) -> None:
        super().__init__(mod)
        self.rows = rows

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(tvm.ir.Op.get("relax.reshape")) or not self.rows.is_rows(call.args[0]):
            return call
        source = call.args[0]
        rows, n = source.ty.shape
        flat = self.builder_.match_cast(source, relax.TensorType([self.rows.compound(rows), n], source.ty.dtype))
        return relax.op.reshape(flat, call.args[1])


def plain_rows(mod):
    """``mod`` with its ``main``'s dense layers on compound rows working on a plain rows var, and the
    reshapes and elementwise ops around them as the module docstring says."""
    main = mod.get_global_var("main")
    rows = _PlainRows(mod, mod["main"])
    rows.builder_.update_func(main, rows.visit_expr(mod["main"]))
    mod = relax.transform.DeadCodeElimination()(rows.builder_.get())
    views = _ViewReshapes(mod, rows)
    views.builder_.update_func(main, views.visit_expr(mod["main"]))
    return views.builder_.get()

