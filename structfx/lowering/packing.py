"""Dense weights packed once, at compile time, into the panels the GEMM micro-kernel streams.

A dense layer ``x @ w.T`` (``matmul(x, permute_dims(w))`` with ``w`` a parameter of ``main``, or
``matmul(x, w)`` with ``w`` (K, N) a parameter, as transformers' ``Conv1D`` stores it; x (M, K),
its rows a plain or compound (``b * s``) extent, or (..., K), its leading dims flattened to such rows)
becomes a call of ``dense_packed`` on ``x`` and ``w`` packed into panels (Goto & van de Geijn, "Anatomy
of high-performance matrix multiplication", 2008; BLIS's packed B): ``w`` (N, K) zero-padded to a
multiple of P rows and laid out as (N / P, K, P), P = PANEL_VECTORS vectors of the target (16 floats on
AVX2, 32 on AVX-512), so the micro-kernel reads each panel of P columns of B contiguously along K.
The packing is Relax ops on the parameter alone; Relax's ``LiftTransformParams`` moves them (and any
other computation on parameters alone) into a function run once here, at compile time
(``lift_weight_packing``), and the compiled ``main`` takes the packed weights: the per-call path never
repacks, and the artifact stores the packed weights.
"""

from __future__ import annotations

from structfx.lowering.compat import relax, te, tirx, tvm
from structfx.lowering.lifting import fusible_with_epilogue, run_weight_computations
from structfx.lowering.ops.common import vector_lanes

#: Vectors of B per packed panel: the micro-kernel's NR is this many vectors (16 floats on AVX2).
PANEL_VECTORS = 2
#: The accumulation's rows are M rounded up to a multiple of this: every register tile height of the
#: schedule rule (4 and 6 rows, schedule_rules/dense_packed.py) divides it, so a tile never runs past the
#: rows computed; only the tiles the output needs are computed (the last one re-reads A's last row where M
#: is not a multiple of its height; those rows are never stored).
ROW_MULTIPLE = 12
#: Name of the kernel, and of its accumulation block (how the schedule rule recognises it).
KERNEL, ACCUMULATE = "dense_packed", "dense_packed_accumulate"


def dense_packed(a: te.Tensor, packed: te.Tensor, n: int) -> te.Tensor:
    """``a @ w.T`` from ``w`` packed: ``a`` (M, K) float32, M possibly symbolic; ``packed``
    (ceil(N / P), K, P) for a panel width P; returns (M, N). The accumulation spans M rounded up to
    ROW_MULTIPLE rows and the padded columns, reading row M - 1 of ``a`` for the padded rows: the
    schedule's tiles then have no tail."""
    m, k_extent = a.shape
    rows = tvm.sym.Analyzer().simplify(tirx.floordiv(m + (ROW_MULTIPLE - 1), ROW_MULTIPLE) * ROW_MULTIPLE)
    panel = packed.shape[2]
    k = te.reduce_axis((0, k_extent), name="k")
    acc = te.compute(
        (rows, packed.shape[0] * panel),
        lambda i, j: te.sum(a[tirx.min(i, m - 1), k] * packed[j // panel, k, j % panel], axis=k),
        name=ACCUMULATE,
    )
    return te.compute((m, n), lambda i, j: acc[i, j], name=KERNEL)


def pack(weight: relax.Expr, n: int, k: int, panel: int) -> relax.Expr:
    """``weight`` (N, K) as panels (ceil(N / panel), K, panel), rows past N zero."""
    panels = -(-n // panel)
    if panels * panel != n:
        weight = relax.op.nn.pad(weight, [0, panels * panel - n, 0, 0])
    return relax.op.permute_dims(relax.op.reshape(weight, [panels, panel, k]), [0, 2, 1])


def kernel_call(builder, x: relax.Expr, packed: relax.Expr, n: int) -> relax.Call:
    """A call of ``dense_packed`` on ``x`` and ``packed``, marked fusible with the ops after it."""
    return fusible_with_epilogue(builder, builder.call_te(dense_packed, x, packed, n, primfunc_name_hint=KERNEL))


def _product(dims: list):
    """The product of a shape's dims, simplified (``b * s`` for two symbolic dims)."""
    total = dims[0]
    for dim in dims[1:]:
        total = total * dim
    return tvm.sym.Analyzer().simplify(total)


@relax.expr_functor.mutator
class _DensePacker(relax.PyExprMutator):
    """``matmul(x, permute_dims(w))`` with ``w`` one of ``weights`` as ``dense_packed(x, pack(w))``; an
    ``x`` of more than two dims (a layer on a (batch, seq, K) input that torch.export left 3-D) on its rows
    flattened, reshaped back after."""

    def __init__(self, mod, weights: list, panel: int) -> None:
        super().__init__(mod)
        self.weights, self.panel = weights, panel

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        weight = self._packable_weight(call)
        if weight is None:
            return call
        n, k = (int(d) for d in weight.ty.shape)
        x = call.args[0]
        leading = list(x.ty.shape)[:-1]
        if len(leading) > 1:  # (..., K): the layer on its rows flattened, the result given its leading dims back
            x = self.builder_.emit(relax.op.reshape(x, [_product(leading), k]))
        product = kernel_call(self.builder_, x, self.builder_.emit(pack(weight, n, k, self.panel)), n)
        if len(leading) > 1:
            return relax.op.reshape(self.builder_.emit(product), [*leading, n])
        return product


    def _packable_weight(self, call: relax.Call):
        """The (N, K) weight of a float32 dense layer ``matmul(x (..., K), permute_dims(w (N, K)))``
        (``nn.Linear``) or ``matmul(x (..., K), w (K, N))`` (transformers' ``Conv1D``) with ``w`` a
        parameter, or None: ``w`` itself, or its transpose (a Relax op on the parameter alone, lifted with
        the packing). A 16-bit layer's float32 operands are casts of its own (``structfx.lowering.aten``):
        its weight's cast is lifted with the packing too."""
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
            return None
        x, operand = call.args
        if not isinstance(operand, relax.Var) or x.ty.shape is None or len(x.ty.shape) < 2:
            return None
        if x.ty.dtype != "float32" or str(call.attrs.out_dtype) not in ("", "float32"):
            return None
        widened = self._widened(operand)
        weight = self._weight_before_cast(operand if widened is None else widened)
        if weight is not None and weight.ty.dtype != "float32":  # cast with the packing, once
            weight = self.builder_.emit(relax.op.astype(weight, "float32"))
        return weight

    def _widened(self, value):
        """The 16-bit float value ``value`` is the float32 cast of (``structfx.lowering.aten`` widens 16-bit
        layers' operands), or None."""
        cast = self.lookup_binding(value)
        if not isinstance(cast, relax.Call) or not isinstance(cast.op, tvm.ir.Op) or cast.op.name != "relax.astype":
            return None
        source = cast.args[0]
        return source if isinstance(source, relax.Var) and source.ty.dtype in ("float16", "bfloat16") else None

    def _weight_before_cast(self, operand):
        """The (N, K) parameter ``operand`` is, or is the transpose of, or None."""
        if self._is_weight(operand):
            weight = self.builder_.emit(relax.op.permute_dims(operand, [1, 0]))
        else:
            binding = self.lookup_binding(operand)
            if not isinstance(binding, relax.Call) or not isinstance(binding.op, tvm.ir.Op):
                return None
            if binding.op.name != "relax.permute_dims" or not self._is_weight(binding.args[0]):
                return None
            axes = binding.attrs.axes
            if axes is not None and [int(a) for a in axes] != [1, 0]:
                return None
            weight = binding.args[0]
        return weight

    def _is_weight(self, value) -> bool:
        """Whether ``value`` is a float (32-bit, or 16-bit widened to it) 2-D parameter of static shape."""
        ty = value.ty
        return (any(value.same_as(w) for w in self.weights) and isinstance(ty, relax.TensorType)
                and ty.dtype in ("float32", "float16", "bfloat16") and ty.shape is not None and len(ty.shape) == 2
                and all(isinstance(d, tirx.IntImm) for d in ty.shape))


def pack_dense_weights(mod, panel: int):
    """``mod`` with every dense layer of ``main`` on weights packed in panels of ``panel`` columns
    (see the module docstring)."""
    main = mod["main"]
    count = int(main.attrs["num_input"])
    packer = _DensePacker(mod, list(main.params[count:]), panel)
    packer.builder_.update_func(mod.get_global_var("main"), packer.visit_expr(main))
    return packer.builder_.get()


def lift_weight_packing(mod, params: list, target) -> tuple:
    """Pack the dense layers' weights of ``mod`` (``main`` with ``num_input`` inputs followed by the
    parameters ``params``, TVM tensors in order) and run the packing now: (module whose ``main`` takes
    the packed parameters, the packed parameters). Other computations on parameters alone are lifted
    and run now as well. A module without a dense layer to pack is returned as it is."""
    packed = pack_dense_weights(mod, PANEL_VECTORS * vector_lanes(target))
    if not any(gv.name_hint.startswith(KERNEL) for gv in packed.get_global_vars()):
        return mod, params
    return run_weight_computations(relax.transform.DeadCodeElimination()(packed), params)
