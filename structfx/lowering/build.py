"""``structfx.compile``: torch.export -> Relax (our ops through our converters) -> scheduled TIR -> VM.

Every failure leaves as a StructfxError that names its stage (export, import, legalize, schedule,
build), the op it failed on (the fx node, the Relax op or the kernel) and what to do, cause chained.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor, nn

from structfx.errors import StructfxError, require_module, require_path
from structfx.lowering.compat import detach_params, from_exported_program, relax, tvm
from structfx.lowering.compiled import CompiledModel
from structfx.lowering.conv_packing import lift_conv_weights
from structfx.lowering.converters import converter_map
from structfx.lowering.export import (
    example_arguments,
    export_for_compile,
    input_specs,
    output_specs,
    require_tensor_outputs,
)
from structfx.lowering.fusion import unbroadcast_matmul_weights
from structfx.lowering.graph_fixes import prepare_for_import
from structfx.lowering.mutations import expose_mutations, initial_state, unregistered_write
from structfx.lowering.nan_propagation import propagate_nan
from structfx.lowering.ops.common import is_ours
from structfx.lowering.packing import lift_weight_packing
from structfx.lowering.parallel_grain import BUILD_CONFIG, apply_parallel_grain
from structfx.lowering.pool_divisors import rescale_divisor_overrides
from structfx.lowering.pool_windows import clip_pool_windows
from structfx.lowering.reduction_identities import infinite_identities
from structfx.lowering.schedules import apply_schedules, legalize, schedule_rules_for
from structfx.lowering.state import restored_state, warn_state_updates
from structfx.lowering.target import resolve_target
from structfx.lowering.tuning.database import TuningDatabase

#: What TVM and the torch importer raise (TVM's own errors subclass RuntimeError, ValueError...).
FAILURES = (RuntimeError, ValueError, TypeError, AssertionError, KeyError, IndexError, NotImplementedError,
            AttributeError)
UNSUPPORTED_HINT = (
    "if TVM does not support this op, rewrite that part of forward with ops it does (see README, "
    "'How compile works'), or keep it out of the compiled module"
)


def compile(model: nn.Module, example_inputs: Tensor | tuple, target=None, database=None) -> CompiledModel:
    """Compile ``model`` for ``target`` (default: this CPU). Weights stay out of the kernels (they are
    inputs of the compiled function), so one build serves any weights of the same shapes. With
    ``database`` (from ``structfx.tune``), each kernel takes its best tuned schedule.

    ``model``: an ``nn.Module`` that ``torch.export`` can capture (``structfx.transform``'s result is,
    wherever the original is); it is exported in eval mode and not modified. ``example_inputs``: a
    tensor, tuple or dict of tensors of one forward call; the batch (dim 0 of every input that has
    one) and the sequence length of token inputs stay symbolic where the model allows. ``target``:
    ``None``/``"llvm"``/``"cpu"`` (this CPU, detected), ``"cuda"`` (this machine's GPU),
    ``"cuda -arch=sm_XY"``, a dict or a ``tvm.target.Target``. ``database``: a
    directory written by ``structfx.tune`` for the same target and TVM version.

    Returns a ``CompiledModel``: call it with torch tensors of the exported shapes and dtypes (any
    batch size where the batch is symbolic); it returns torch tensors in the model's output structure.
    In-place updates are eager's: an input ``forward`` writes holds its new value after each call, and the
    buffers it updates are the CompiledModel's own ``state``, updated by every call (structfx.lowering.mutations).
    ``.save(dir)`` writes the artifact ``structfx.runtime.load`` runs.

    Raises StructfxError naming the stage (export, import, legalize, schedule, build), the op and the
    fix for a model torch.export or TVM cannot take, an unsupported or malformed target (``"cuda"``
    without an arch on a machine without a GPU), and a database that is not one or was tuned for
    another target or TVM version.
    """
    require_module(model, "compile")
    args = example_arguments(example_inputs, "compile")
    tvm_target = resolve_target(target)
    if database is not None:
        require_path(database, "database")
        TuningDatabase(database, tvm_target, create=False)  # a wrong database fails before the long steps
    with restored_state(model) as updated:
        program = export_for_compile(model, args)
    require_tensor_outputs(program, model)
    inputs, outputs = input_specs(program), output_specs(program)
    mod, params, mutations = lower_program(program, tvm_target)
    warn_state_updates(model, [name for name in updated if name not in dict(mutations.state)])
    mod = schedule_module(legalize_module(mod, tvm_target), tvm_target, database)
    kernels = sorted(gv.name_hint for gv, _ in mod.functions_items() if is_ours(gv.name_hint))
    try:
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            executable = tvm.compile(mod, target=tvm_target)
    except FAILURES as e:
        raise StructfxError(
            f"[build] tvm.compile failed on kernel {_failing_build(mod, tvm_target)}: {_gist(e)}; report it with "
            f"the model, and meanwhile compile the modules around the part that kernel comes from"
        ) from e
    return CompiledModel(
        executable, params, inputs, outputs, program.call_spec.out_spec, tvm_target, kernels,
        mutations, initial_state(model, mutations),
    )


def lower_to_relax(program, target):
    """The Relax module of an exported program, parameters detached: (module, [weights in order]); see
    ``lower_program``."""
    mod, params, _ = lower_program(program, target)
    return mod, params


def lower_program(program, target):
    """(Relax module, [weights in order], Mutations) of an exported program, parameters detached. On
    the CPU, dense layers' weights come back packed for the GEMM kernel (structfx.lowering.packing), and
    convolutions' with their batch norms folded in and packed (structfx.lowering.conv_packing). What the
    forward updates in place comes out of ``main`` before its own outputs, and the buffers and parameters
    it updates go in after the user inputs (structfx.lowering.mutations)."""
    try:
        with torch.no_grad():
            program = prepare_for_import(program)
            mutations = expose_mutations(program)
            clip_pool_windows(program.graph_module)
            rescale_divisor_overrides(program.graph_module)
            mod = from_exported_program(program, keep_params_as_input=True,
                                        custom_convert_map=converter_map(target), run_ep_decomposition=False)
    except FAILURES as e:
        unregistered = unregistered_write(e)
        if unregistered is not None:
            raise unregistered from e
        raise StructfxError(_import_failure(e, program)) from e
    mod, params = detach_params(mod)
    # the importer hands torch's parameters over by DLPack, sharing their memory: copied, the compiled
    # model (and what it saves) keeps the weights it was compiled with when the model is trained on
    params = [tvm.runtime.tensor(p.numpy()) for p in params.get("main", [])]
    mod = _sizes_from_one(mod)
    if target.kind.name == "llvm":
        mod, params = lift_conv_weights(mod, params, target)
        mod, params = lift_weight_packing(unbroadcast_matmul_weights(mod), params, target)
    return mod, params, mutations


def _sizes_from_one(mod):
    """torch.export bounds a symbolic size below by 2 (it specialises 0 and 1); the compiled code
    serves 1 as well, so tell TVM so."""
    func = mod["main"]
    bounds = func.attrs.get("tir_var_lower_bound") if func.attrs is not None else None
    if bounds:
        attrs = {**func.attrs, "tir_var_lower_bound": {name: min(int(v), 1) for name, v in bounds.items()}}
        mod["main"] = func.with_attrs(attrs) if hasattr(func, "with_attrs") else func.with_attr(
            "tir_var_lower_bound", attrs["tir_var_lower_bound"])
    return mod


def legalize_module(mod, target):
    try:
        return legalize(mod, target)
    except FAILURES as e:
        raise StructfxError(
            f"[legalize] TVM cannot lower {_failing_relax_op(mod, target)}: {_gist(e)}; {UNSUPPORTED_HINT}"
        ) from e


def schedule_module(mod, target, database=None):
    """Each kernel scheduled: by its best record in ``database`` where it has one, else by the rules;
    then each parallel loop with too little work to share runs serially (structfx.lowering.parallel_grain),
    max and min reductions start from -inf and +inf (structfx.lowering.reduction_identities), and float
    max and min propagate NaN as torch's do (structfx.lowering.nan_propagation)."""
    try:
        if database is not None:
            from structfx.lowering.tuning import apply_database

            mod = apply_database(mod, target, database)
        scheduled = apply_parallel_grain(apply_schedules(mod, target), target)
        return propagate_nan(infinite_identities(scheduled), target)
    except FAILURES as e:
        raise StructfxError(
            f"[schedule] no schedule for kernel {_failing_kernel(mod, target)}: {_gist(e)}; "
            + ("compile without the database, or " if database is not None else "")
            + "report it with the model, and meanwhile compile the modules around the part that kernel comes from"
        ) from e


def _gist(error: Exception) -> str:
    """The line of a (long, C++) error that says what failed, and the call TVM names, if it names one."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    checks = [line for line in lines if "Check failed" in line]
    gist = (checks or lines or [type(error).__name__])[0][:400]
    if "Offending call:" in lines[:-1]:
        gist += f" (at {lines[lines.index('Offending call:') + 1]})"
    return gist


def _import_failure(error: Exception, program) -> str:
    """The [import] message: an op TVM has no converter for gets the rewrite hint; a converter that failed
    (the op is supported, a shape or dtype of this call is not) is named with its operands' and result's
    shapes as torch proved them, and gets no hint to rewrite a supported op."""
    node = _converting_node(error)
    if node is None:
        return f"[import] TVM cannot import {_describe(_unsupported_node(error, program))}: {_gist(error)}; " + (
            UNSUPPORTED_HINT)
    shapes = ", ".join(f"{a.name}: {_torch_shape(a)}" for a in node.all_input_nodes)
    return (
        f"[import] TVM's converter of aten.{_key(node.target)} failed on {_describe(node)} (operands {shapes}; "
        f"torch's result {_torch_shape(node)}): {_gist(error)}; the op is supported, this call's shapes are not: "
        f"report it with the model, and meanwhile compile the modules around that part of forward"
    )


def _torch_shape(node: torch.fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, Tensor):
        return f"({', '.join(str(s) for s in value.shape)})"
    return str(value)


def _converting_node(error: Exception) -> torch.fx.Node | None:
    """The fx node a converter was converting when ``error`` was raised (the innermost frame with a
    ``node``), None where no converter ran (an op without one)."""
    tb, found = error.__traceback__, None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node):
            found = node
        tb = tb.tb_next
    return found


def _unsupported_node(error: Exception, program) -> torch.fx.Node | None:
    """The first node of an op TVM lists as unsupported."""
    unsupported = set(re.findall(r"'([\w.]+)'", str(error)))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    return next((n for n in calls if _key(n.target) in unsupported), None)


def _describe(node: torch.fx.Node | None) -> str:
    if node is None:
        return "the exported program"
    stack = node.meta.get("stack_trace", "").strip().splitlines()
    where = f" (from {stack[-2].strip()})" if len(stack) >= 2 else ""
    return f"fx node {node.format_node()}{where}"


def _key(target) -> str:
    """How TVM's importer names an ATen op: ``lgamma.default``."""
    return f"{getattr(target, '_opname', target)}.{getattr(target, '_overloadname', '')}"


def _failing_relax_op(mod, target) -> str:
    """Legalize again, recording each call, to name the Relax op that fails (only run on failure)."""
    current = []

    def recording(legalize_op):
        def legalize_call(bb, call):
            current.append(call)
            result = legalize_op(bb, call)
            current.pop()
            return result

        return legalize_call

    ops = {}
    for name in tvm.ir.Op.list_op_names():
        legalize_op = tvm.ir.Op.get(name).get_attr("FLegalize")
        if legalize_op is not None:
            ops[name] = recording(legalize_op)
    with target, contextlib.suppress(*FAILURES):
        relax.transform.LegalizeOps(ops)(mod)
    if not current:
        return "the module"
    call = current[-1]
    args = ", ".join(str(a.ty) for a in call.args if isinstance(a, relax.Expr))
    return f"Relax op {call.op.name}({args})"


def _failing_build(mod, target) -> str:
    """Build each scheduled PrimFunc alone to name the one TVM cannot build (only run on failure)."""

    def build(gv, func):
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            tvm.tirx.build(func.with_attr("global_symbol", gv.name_hint), target=target)

    return _first_failing(mod, build)


def _failing_kernel(mod, target) -> str:
    """Schedule each PrimFunc alone to name the one that fails (only run on failure)."""

    def schedule(gv, func):
        with target:
            tvm.s_tir.dlight.ApplyDefaultSchedule(*schedule_rules_for(target))(tvm.IRModule({gv: func}))

    return _first_failing(mod, schedule)


def _first_failing(mod, attempt) -> str:
    """The name of the first PrimFunc of ``mod`` on which ``attempt(gv, func)`` raises one of FAILURES."""
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            attempt(gv, func)
        except FAILURES:
            return gv.name_hint
    return "(none alone)"
