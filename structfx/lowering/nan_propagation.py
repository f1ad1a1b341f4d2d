"""torch's NaN semantics for the float ``max`` and ``min`` of compiled kernels.

torch propagates NaN through everything built on max and min (IEEE 754-2019 ``maximum``): ``relu``,
``clamp``/``relu6``/``hardtanh``, ``torch.maximum``/``minimum``, max and min reductions, max pooling,
ELU. TVM's code generators do not: LLVM's lowers ``max(a, b)`` to ``select(a > b, a, b)``, which gives
``b`` when either is NaN (a NaN in ``a`` is lost); CUDA's to ``fmaxf``, which gives the other operand.
Compiled, ``relu(nan)`` was 0 and ``clamp(nan, -1, 1)`` was -1, hiding a diverged model.

This pass rewrites the float max and min of scheduled kernels:

- on the CPU (``llvm``), at no cost where an operand is a constant: ``max(x, c)`` becomes ``max(c, x)``,
  which gives ``x`` when it is NaN (``relu``, ``clamp``); two computed operands become
  ``select(isnan(a), a, max(a, b))`` (one unordered compare and a blend);
- elsewhere, ``select(isnan(a) or isnan(b), a + b, max(a, b))`` (``a + b`` is NaN when either is), the
  check dropped for a constant operand.

A computed operand that is checked is bound once (``Let``): max and min nest (``clamp``, the range
limits of ``fast_tanh``), and each level would otherwise copy its operands into the check (GELU's kernel
ran 10x slower so). The pass runs after scheduling, so schedule rules and tuning see TVM's plain max and
min (reduction rules recognise them); TVM's simplifier keeps operand order. Integer max and min (index
clamps) are left alone.
"""

from __future__ import annotations

import functools

import tvm_ffi

from structfx.lowering.compat import Target, TensorLoad, tirx, tvm

#: PrimFunc attribute of a kernel whose float maxes and mins already give torch's NaN (left as it is).
NAN_EXACT = "structfx.nan_exact"


def propagate_nan(mod, target: Target):
    """``mod`` with every float max and min of its PrimFuncs returning NaN when an operand is NaN, as
    torch's do, in the form that costs least on ``target``'s code generator. Relax functions are left as
    they are. Returns a new IRModule (``mod`` is unchanged)."""
    rewrite = functools.partial(_propagating, select_gives_b=target.kind.name == "llvm")
    changed = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get(NAN_EXACT)):
            mapped = tvm_ffi.structural_map(func, [((tirx.Max, tirx.Min), rewrite)], order="post")
            if not mapped.same_as(func):
                changed[gv] = mapped
    if not changed:
        return mod
    return tvm.IRModule({**dict(mod.functions_items()), **changed}, attrs=mod.attrs)


def _propagating(node, select_gives_b: bool):
    """``node`` (a Max or Min) NaN-propagating. ``select_gives_b``: the code generator lowers it to
    ``select(a > b, a, b)``, so a NaN in ``b`` already comes out."""
    a, b = node.a, node.b
    constant_a, constant_b = isinstance(a, tirx.FloatImm), isinstance(b, tirx.FloatImm)
    if "float" not in str(node.ty) or constant_a and constant_b:
        return node
    if select_gives_b:
        if constant_a:
            return node
        if constant_b:
            return type(node)(b, a)
        check_a, check_b = True, False
    else:
        check_a, check_b = not constant_a, not constant_b
    bound = []
    a, b = _once(a, bound) if check_a else a, _once(b, bound) if check_b else b
    plain = type(node)(a, b)
    if check_a and check_b:
        result = tirx.Select(tirx.Or(isnan(a), isnan(b)), a + b, plain)
    else:
        kept = a if check_a else b
        result = tirx.Select(isnan(kept), kept, plain)
    for var, value in reversed(bound):
        result = tirx.Let(var, value, result)
    return result


def isnan(value):
    """``isnan(value)``; a bfloat16 one widened to float32 first (exact), as TVM has no bfloat16 isnan."""
    return tirx.isnan(value.astype("float32") if str(value.ty) == "bfloat16" else value)


def _once(operand, bound: list):
    """``operand`` itself where reading it again is free (a variable, a load), else a new variable bound to
    it, appended to ``bound`` as (variable, value): the check and the max both read it."""
    if isinstance(operand, tirx.Var | TensorLoad):
        return operand
    var = tirx.Var("nan_operand", operand.ty)
    bound.append((var, operand))
    return var
