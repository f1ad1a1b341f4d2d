"""What there is to tune in a model: every kernel whose schedule rule has knobs (ours, and the generic
rule for the rest of the module), as PrimFuncs with the batch fixed for measuring."""

from __future__ import annotations

from dataclasses import dataclass

from structfx.lowering.compat import Schedule, Target, tirx, tvm
from structfx.lowering.ops.common import OpRule
from structfx.lowering.schedules import rules_for

#: The batch tuning measures at (and the key its records are filed under): 16 * TUNING_ROW_TILES rows.
TUNING_ROW_TILES = 16


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
    """The function with its symbolic batch fixed, as a one-function module named main."""
    bindings = {var: TUNING_ROW_TILES for var in func.params if isinstance(var.ty, tvm.ir.PrimType)}
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
