"""The schedule rules, dlight-style: tried in order on every PrimFunc, our ops first, a generic rule last."""

from __future__ import annotations

from structfx import registry
from structfx.lowering.compat import Schedule, ScheduleRule, Target, dlight, normalize_prim_func
from structfx.lowering.ops.common import OpScheduleRule, vector_lanes
from structfx.lowering.schedule_rules.spatial import parallel_vectorized


class GenericCPU(OpScheduleRule):
    """Everything else on the CPU (TVM's legalized ops): inline what can be inlined, then run each
    block's spatial loops in parallel, an elementwise block's innermost loop vectorised. Correct for any
    PrimFunc; fast only for simple ones. ``tune`` searches these kernels over MetaSchedule's standard
    design space instead (``structfx.lowering.tuning.tasks.standard_space``), so this rule has no knobs."""

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        infos = dlight.base.try_inline(sch, infos)
        for info in infos:
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            if not spatial or len(spatial) != len(loops) - kinds.count("R") or kinds.count("O"):
                continue
            if "R" not in kinds:
                parallel_vectorized(sch, info.block_rv, vector_lanes(target))
                continue
            sch.reorder(*spatial, *[loop for loop, kind in zip(loops, kinds) if kind == "R"])
            sch.parallel(sch.fuse(*spatial))
        return True


def schedule_rules_for(target: Target) -> list[ScheduleRule]:
    """The registered ops' rules for the target's kind (``OpSpec.schedules``), then the rules for everything
    else."""
    ours = [rule() for spec in registry.specs() for rule in spec.load("schedules")
            if rule.target_kind == target.kind.name]
    if target.kind.name == "cuda":
        gpu = dlight.gpu
        return [*ours, gpu.Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction(), gpu.Fallback()]
    from structfx.lowering.schedule_rules.conv import Conv
    from structfx.lowering.schedule_rules.conv_packed import ConvPacked
    from structfx.lowering.schedule_rules.dense_packed import DensePacked
    from structfx.lowering.schedule_rules.matmul import Matmul
    from structfx.lowering.schedule_rules.reduction import RowReduction

    return [*ours, DensePacked(), ConvPacked(), Matmul(), Conv(), RowReduction(), dlight.cpu.Reduction(), GenericCPU()]


def legalize(mod, target: Target):
    """Every Relax op as a TIR PrimFunc (ours already are), fused with its neighbours where TVM's
    operator fusion allows (``structfx.lowering.fusion``), ready to schedule or tune."""
    from structfx.lowering.fusion import legalize_and_fuse

    return legalize_and_fuse(mod, target)


def apply_schedules(mod, target: Target):
    """Schedule each PrimFunc of a legalized module not yet scheduled with the first rule that applies."""
    with target:
        return dlight.ApplyDefaultSchedule(*schedule_rules_for(target))(mod)
