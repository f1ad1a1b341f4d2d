"""``structfx.compile``: torch.export -> Relax (our ops through our converters) -> scheduled TIR -> VM."""

from __future__ import annotations

from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.lowering.compat import detach_params, from_exported_program, relax, tvm
from structfx.lowering.compiled import CompiledModel
from structfx.lowering.converters import converter_map
from structfx.lowering.export import ROW_MULTIPLE, export_for_compile, input_specs, output_specs
from structfx.lowering.schedules import apply_schedules, legalize
from structfx.lowering.target import resolve_target


def compile(model: nn.Module, example_inputs: Tensor | tuple, target=None, database=None) -> CompiledModel:
    """Compile ``model`` for ``target`` (default: this CPU). Weights stay out of the kernels (they are
    inputs of the compiled function), so one build serves any weights of the same shapes. With
    ``database`` (from ``structfx.tune``), each kernel takes its best tuned schedule.

    ``model``: an ``nn.Module`` that ``torch.export`` can capture (``structfx.transform``'s result is,
    wherever the original is); it is exported in eval mode and not modified. ``example_inputs``: a
    tensor or tuple of tensors of one forward call; dim 0 of each becomes a symbolic batch unless the
    model pins it. ``target``: ``None``/``"llvm"``/``"cpu"`` (this CPU, detected), ``"cuda"`` (this
    machine's GPU), ``"cuda -arch=sm_XY"``, a dict or a ``tvm.target.Target``. ``database``: a
    directory written by ``structfx.tune`` for the same target and TVM version.

    Returns a ``CompiledModel``: call it with torch tensors of the exported shapes and dtypes (any
    batch size where the batch is symbolic); it returns torch tensors in the model's output structure.
    ``.save(dir)`` writes the artifact ``structfx.runtime.load`` runs.

    Raises StructfxError for a model torch.export or TVM cannot import, an unsupported or malformed
    target (``"cuda"`` without an arch on a machine without a GPU), and a database that is not one or
    was tuned for another target or TVM version.
    """
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    tvm_target = resolve_target(target)
    program, symbolic_batch = export_for_compile(model, args)
    mod, params = lower_to_relax(program, tvm_target)
    if symbolic_batch:
        mod = define_row_tiles(mod)
    mod = legalize(mod, tvm_target)
    if database is not None:
        from structfx.lowering.tuning import apply_database

        mod = apply_database(mod, tvm_target, database)
    mod = apply_schedules(mod, tvm_target)
    kernels = sorted(gv.name_hint for gv, _ in mod.functions_items() if gv.name_hint.startswith("structfx_"))
    executable = tvm.compile(mod, target=tvm_target)
    return CompiledModel(
        executable, params, input_specs(program), output_specs(program), program.call_spec.out_spec, tvm_target,
        ROW_MULTIPLE if symbolic_batch else None, kernels,
    )


def lower_to_relax(program, target):
    """The Relax module of an exported program, parameters detached: (module, [weights in order])."""
    try:
        mod = from_exported_program(program, keep_params_as_input=True, custom_convert_map=converter_map(target))
    except AssertionError as e:  # TVM reports unsupported torch ops with a bare assertion
        raise StructfxError(f"TVM cannot import this model: {e}") from e
    mod, params = detach_params(mod)
    return mod, list(params.get("main", []))


def define_row_tiles(mod):
    """Give ``main`` a shape parameter ``(q,)`` for the batch ``ROW_MULTIPLE * q``: the VM reads a
    symbolic var only from a dimension that is that var alone, and the kernels need to know the batch
    divides into tiles."""
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    symbolic = list(relax.analysis.free_symbolic_vars(func)) + list(relax.analysis.defined_symbolic_vars(func))
    if len(symbolic) != 1:
        raise StructfxError(f"expected the batch as the only symbolic dimension, found {symbolic}")
    row_tiles = symbolic[0]
    shape_param = relax.Var("row_tiles", relax.ShapeType([row_tiles]))
    params = [*func.params[:num_input], shape_param, *func.params[num_input:]]
    attrs = {**func.attrs, "num_input": num_input + 1, "tir_var_lower_bound": {row_tiles.name: 1}}
    attrs = tvm.ir.make_node("ir.DictAttrs", **attrs)
    mod["main"] = relax.Function(params, func.body, func.ret_ty, func.is_pure, attrs)
    return mod
