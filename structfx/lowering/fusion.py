"""Legalization with operator fusion: every Relax op as TIR, neighbours merged into one kernel.

The order is TVM's own CPU pipeline (``relax.backend.cpu_generic.legalize_passes``): LegalizeOps,
AnnotateTIROpPattern, FuseOps, FuseTIR, so bias adds, activations, residual adds and scales fuse into
the matmul they follow (one PrimFunc with the matmul block and its elementwise epilogue blocks) and
chains of elementwise ops become one kernel. On the CPU a ``matmul(x, permute_dims(w))`` is first made
one ``NT_matmul`` (TVM's FuseTransposeMatmul) that reads ``w`` in its stored (N, K) layout: no
transposed copy of the weights per call, and the matmul schedule rule's dot-product kernel reads both operands
contiguously; dense layers on flattened rows keep their reshapes views and their elementwise neighbours
on their rows (``structfx.lowering.rows``), so those fuse into the kernel's epilogue. On the CPU exp,
erf, tanh, sigmoid, SiLU, GELU and softmax legalize to TVM's vectorisable approximations
(``structfx.lowering.fast_math``) instead of scalar libm calls, and attention's softmax with its guard for
rows of masked keys is one kernel (``structfx.lowering.safe_softmax``). Last, every copy kernel that only
reshapes becomes a view (``RewriteDataflowReshape``: ``vm.builtin.reshape``, no copy): ``tvm.compile`` runs
that pass too, but after our schedules, and a scheduled copy (split, vectorised, parallel) no longer reads
as a reshape, so every head split, head merge and flattening around attention stayed a copy. Our own
kernels (PrimFuncs named ``structfx_*``) are marked opaque, so fusion leaves them and their block names as
they are, except those their converter marked fusible with an epilogue (BTT on the CPU): fusion adds the
elementwise ops after them to the kernel (named ``fused_structfx_*`` then), and their schedule rules find
them by their block names.
"""

from __future__ import annotations

from structfx.lowering.batched_matmul import fold_batched_matmuls
from structfx.lowering.compat import Target, relax, tirx, tvm
from structfx.lowering.fast_math import fast_math_legalizations
from structfx.lowering.lifting import OUT_ELEMWISE_FUSABLE
from structfx.lowering.rows import plain_rows
from structfx.lowering.safe_softmax import fuse_safe_softmax

#: TVM's OpPatternKind kOpaque: FuseOps neither fuses into nor out of such a function.
OPAQUE = 8


def legalize_and_fuse(mod, target: Target):
    """``mod`` with every Relax op lowered to TIR and fusible neighbours merged into one PrimFunc each."""
    cpu = target.kind.name == "llvm"
    with target:
        if cpu:
            mod = fold_batched_matmuls(unbroadcast_matmul_weights(mod), target)
            mod = fuse_safe_softmax(plain_rows(fuse_transpose_matmul(mod)))
        mod = relax.transform.LegalizeOps(fast_math_legalizations() if cpu else None)(mod)
        mod = relax.transform.AnnotateTIROpPattern()(mod)
        mod = mark_ours_opaque(mod)
        mod = relax.transform.FuseOps()(mod)
        mod = relax.transform.FuseTIR()(mod)
        mod = relax.transform.DeadCodeElimination()(mod)
        return relax.transform.RewriteDataflowReshape()(mod)


def fuse_transpose_matmul(mod):
    """TVM's FuseTransposeMatmul without the case it crashes on: ``x @ x^T`` (one tensor on both sides
    becomes a one-parameter composite function, whose code generator then reads a second argument:
    ``IndexError: Index out of range. size: 1, got index 1``). Such a matmul stays as it is."""
    from tvm.relax.transform import fuse_transpose_matmul as upstream

    pattern, annotations, check = upstream._pattern()

    def distinct_operands(context) -> bool:
        found = context.annotated_expr
        return check(context) and not found["x"].same_as(found["w"])

    mod = relax.transform.FuseOpsByPattern(
        [("transpose_matmul_fuse", pattern, annotations, distinct_operands)], bind_constants=False
    )(mod)
    fuser = upstream._TransposeMatmulFuser(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fuser.builder_.update_func(gv, fuser.visit_expr(func))
    return fuser.builder_.get()


def unbroadcast_matmul_weights(mod):
    """``matmul(x, broadcast_to(w2d, (B, K, N)))`` as ``matmul(x, w2d)``, which broadcasts the same way:
    torch.export spells a linear layer on a non-contiguous 3-D input as expand + bmm, which would copy
    the weight B times per call. A ``broadcast_to`` of a tensor to its own shape is dropped as well."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x, w, shape = wildcard(), wildcard(), wildcard()
    broadcast = is_op("relax.broadcast_to")(w, shape)
    weight_matmul = is_op("relax.matmul")(x, broadcast)

    def drop_weight_broadcast(call, matches):
        weight = matches[w]
        if weight.ty.ndim != 2 or not _same_dims(weight.ty.shape, list(call.args[1].ty.shape)[-2:]):
            return call
        return relax.op.matmul(matches[x], weight, out_dtype=call.attrs.out_dtype)

    def drop_identity_broadcast(call, matches):
        source = matches[w]
        return source if _same_dims(source.ty.shape, call.ty.shape) else call

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            func = rewrite_call(weight_matmul, drop_weight_broadcast, func)
            mod[gv] = rewrite_call(broadcast, drop_identity_broadcast, func)
    return mod


def _same_dims(a, b) -> bool:
    """Whether two shapes are provably equal (False where either is unknown)."""
    if a is None or b is None:
        return False
    a, b = list(a), list(b)
    analyzer = tvm.sym.Analyzer()
    return len(a) == len(b) and all(analyzer.can_prove_equal(x, y) for x, y in zip(a, b))


def mark_ours_opaque(mod):
    """Our kernels (``structfx_*``) with ``op_pattern`` set to opaque, whatever the analysis found, except
    those their converter marked fusible with the elementwise ops after them (``fusible_with_epilogue``)."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("structfx_"):
            pattern = func.attrs.get("op_pattern") if func.attrs is not None else None
            if pattern is None or int(pattern) != OUT_ELEMWISE_FUSABLE:
                mod[gv] = func.with_attr("op_pattern", OPAQUE)
    return mod
