"""What there is to tune in a model: every kernel whose schedule rule has knobs (ours, and the generic
rule for the rest of the module), as PrimFuncs with the batch fixed for measuring."""

from __future__ import annotations

from dataclasses import dataclass

from structfx.lowering.compat import Schedule, Target, tirx, tvm
from structfx.lowering.ops.common import OpRule
from structfx.lowering.schedules import rules_for

#: The rows tuning measures at (and the key its records are filed under): a kernel's symbolic sizes are
#: fixed so that their product is TUNING_ROWS (all of it for the batch alone; 16 x 16 for batch x sequence).
TUNING_ROWS = 256


@dataclass
class Task:
    name: str
    workload: tvm.IRModule  # the batch fixed: what is measured and what the database is keyed by
    rule: OpRule


def our_rule(func: tirx.PrimFunc, target: Target) -> OpRule | None:
    """The first OpRule that schedules ``func`` (ours for our kernels, the generic rule otherwise)."""
    for rule in rules_for(target):
        if isinstance(rule, OpRule) and rule.apply(func, target, False) is not None:
            return rule
    return None


def workload_of(func: tirx.PrimFunc) -> tvm.IRModule:
    """The function with its symbolic sizes fixed (TUNING_ROWS), as a one-function module named main."""
    buffers = [p for p in func.params if not isinstance(p.ty, tvm.ir.PrimType)]
    symbolic = list(dict.fromkeys(
        [p for p in func.params if isinstance(p.ty, tvm.ir.PrimType)]
        + [d for buffer in buffers for d in buffer.shape if isinstance(d, tirx.Var)]
    ))
    size = round(TUNING_ROWS ** (1 / len(symbolic))) if symbolic else 0
    bindings, pending = {}, set(symbolic)
    for param in func.params:
        if isinstance(param.ty, tvm.ir.PrimType):
            bindings[param] = size
            pending.discard(param)
        elif any(isinstance(d, tirx.Var) and d in pending for d in param.shape):
            shape = [tirx.IntImm(str(d.ty), size) if isinstance(d, tirx.Var) else d for d in param.shape]
            bindings[param] = tirx.decl_buffer(shape, param.dtype, param.name, elem_offset=param.elem_offset)
            pending -= {d for d in param.shape if isinstance(d, tirx.Var)}
    fixed = func.specialize(bindings) if bindings else func
    return tvm.IRModule({"main": fixed.with_attr("global_symbol", "main")})


def extract_tasks(mod: tvm.IRModule, target: Target) -> list[Task]:
    """One task per kernel with knobs in a legalized Relax module."""
    tasks = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            rule = our_rule(func, target)
            if rule is not None and rule.has_knobs:
                tasks.append(Task(gv.name_hint, workload_of(func), rule))
    return tasks


def hand_schedule(task: Task, target: Target) -> Schedule:
    sch = Schedule(task.workload)
    task.rule.schedule(sch, target, False)
    return sch
