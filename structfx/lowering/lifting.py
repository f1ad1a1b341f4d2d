"""Computations on parameters alone, run once at compile time, and our kernels marked fusible with the
elementwise ops after them: what the dense (``structfx.lowering.packing``), convolution
(``structfx.lowering.conv_packing``) and attention (``structfx.lowering.batched_matmul``) rewrites share."""

from __future__ import annotations

from structfx.lowering.compat import relax, tvm
from structfx.runtime.host import use_every_core

#: TVM's OpPatternKind kOutEWiseFusable: FuseOps fuses elementwise ops after such a function into it.
OUT_ELEMWISE_FUSABLE = 4
#: The function Relax's LiftTransformParams makes of ``main``'s computations on parameters alone.
TRANSFORM = "main_transform_params"


def fusible_with_epilogue(builder: relax.BlockBuilder, call: relax.Call) -> relax.Call:
    """``call`` (a ``call_tir`` the builder emitted with ``call_te``), its PrimFunc marked
    OUT_ELEMWISE_FUSABLE."""
    gv = call.args[0]
    builder.update_func(gv, builder.get()[gv].with_attr("op_pattern", OUT_ELEMWISE_FUSABLE))
    return call


def run_weight_computations(mod, params: list) -> tuple:
    """``mod`` (``main`` with ``num_input`` inputs followed by the parameters ``params``, TVM tensors in
    order) with its computations on parameters alone lifted out (Relax's ``LiftTransformParams``) and run
    now, on this CPU: (module whose ``main`` takes their results, those results). ``mod`` and ``params``
    as they are where there is nothing to lift."""
    lifted = relax.transform.LiftTransformParams()(mod)
    if TRANSFORM not in [gv.name_hint for gv in lifted.get_global_vars()]:
        return mod, params
    transform = relax.transform.DeadCodeElimination([TRANSFORM])(_without(lifted, "main"))
    executable = tvm.compile(transform, target=tvm.target.Target("llvm"))
    use_every_core()
    results = relax.VirtualMachine(executable, tvm.cpu(0))[TRANSFORM](params)
    return _without(lifted, TRANSFORM), list(results)


def _without(mod, name: str):
    functions = {gv: f for gv, f in mod.functions_items() if gv.name_hint != name}
    return tvm.IRModule(functions, attrs=mod.attrs)
