"""What there is to tune in a model: every kernel whose design space samples something, as a PrimFunc
with the batch fixed for measuring.

Our kernels (``structfx_*``, ``fused_structfx_*`` with an epilogue) are searched over their hand schedules'
knobs (``OpScheduleRule.schedule`` with ``tunable=True``); every other kernel over MetaSchedule's standard CPU
design space (``PostOrderApply`` with the target's default schedule rules: multi-level tiling,
parallelisation, vectorisation, unrolling, and its default postprocessors). A kernel whose space has no
sampled decision has one schedule only (e.g. a reduction under a rule whose knobs are for elementwise
loops): it is not a task, so no trial is spent measuring the same schedule again.
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass

from structfx.lowering.compat import Schedule, Target, meta_schedule, tirx, tvm
from structfx.lowering.ops.common import OpScheduleRule, is_ours
from structfx.lowering.schedules import schedule_rules_for

ms = meta_schedule

#: The rows tuning measures at (and the key its records are filed under): a kernel's symbolic sizes are
#: fixed so that their product is TUNING_ROWS (all of it for the batch alone; 16 x 16 for batch x sequence).
TUNING_ROWS = 256


@dataclass
class Task:
    name: str
    workload: tvm.IRModule  # the batch fixed: what is measured and what the database is keyed by
    space: ms.space_generator.SpaceGenerator
    hand: Schedule  # the schedule compile gives it without a database: measured first


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


def hand_schedule(workload: tvm.IRModule, target: Target) -> Schedule | None:
    """What compile's schedule rules do to the workload: the first that applies (as ApplyDefaultSchedule)."""
    for rule in schedule_rules_for(target):
        with target:
            found = rule.apply(workload["main"], target, False)
        if isinstance(found, list):
            found = found[0] if found else None
        if found is not None:
            return found
    return None


def knob_space(rule: OpScheduleRule, target: Target) -> ms.space_generator.SpaceGenerator:
    """The rule's hand schedule with its knobs sampled: nothing else added, nothing checked after."""

    def sampled(sch: Schedule) -> Schedule:
        rule.schedule(sch, target, True)
        return sch

    return ms.space_generator.ScheduleFn(sampled, sch_rules=[], postprocs=[], mutator_probs={})


def standard_space() -> ms.space_generator.SpaceGenerator:
    """MetaSchedule's own design space with the target's default rules, postprocessors and mutators."""
    return ms.space_generator.PostOrderApply()


def context(task_name: str, workload: tvm.IRModule, space, target: Target, logger=None) -> ms.TuneContext:
    return ms.TuneContext(mod=workload, target=target, space_generator=space, search_strategy="replay-trace",
                          task_name=task_name, num_threads=1, logger=logger).clone()


def samples_anything(workload: tvm.IRModule, space, target: Target) -> bool:
    """Whether some design space of ``space`` on ``workload`` has a sampled decision to search."""
    return any(len(sch.trace.decisions) for sch in context("probe", workload, space, target).generate_design_space())


def extract_tasks(mod: tvm.IRModule, target: Target) -> list[Task]:
    """One task per kernel of a legalized Relax module with something to tune."""
    tasks = []
    with without_tensor_intrinsics():
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            workload = workload_of(func)
            hand = hand_schedule(workload, target)
            if hand is None:
                continue
            if is_ours(gv.name_hint):
                rule = our_schedule_rule(workload["main"], target)
                space = knob_space(rule, target) if rule is not None and rule.has_knobs else None
            else:
                space = standard_space()
            if space is not None and samples_anything(workload, space, target):
                tasks.append(Task(gv.name_hint, workload, space, hand))
    return tasks


def our_schedule_rule(func: tirx.PrimFunc, target: Target) -> OpScheduleRule | None:
    """The first of our OpScheduleRules that schedules ``func``."""
    for rule in schedule_rules_for(target):
        if isinstance(rule, OpScheduleRule) and rule.apply(func, target, False) is not None:
            return rule
    return None


@contextlib.contextmanager
def without_tensor_intrinsics():
    """MetaSchedule's TuneContext imports every tensorization intrinsic TVM has (parsing some 250
    TVMScript functions: about 40 s here) although the CPU design spaces here use none. Stand in an
    empty module meanwhile; a real import later still gets the real one."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]
