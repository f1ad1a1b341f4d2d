"""The schedule rules, dlight-style: tried in order on every PrimFunc, our ops first, a generic rule last."""

from __future__ import annotations

from structfx.lowering.compat import Schedule, ScheduleRule, Target, dlight, normalize_prim_func, tirx


class GenericCPU(ScheduleRule):
    """Everything else on the CPU (TVM's legalized ops): inline what can be inlined, then run each
    block's spatial loops in parallel. Correct for any PrimFunc; fast only for simple ones."""

    def apply(self, func, target: Target, tunable: bool) -> Schedule | None:
        if target.kind.name != "llvm" or not isinstance(func, tirx.PrimFunc):
            return None
        sch = Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = dlight.base.try_inline(sch, infos)
        for info in infos:
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            if not spatial or len(spatial) != len(loops) - kinds.count("R") or kinds.count("O"):
                continue
            sch.reorder(*spatial, *[loop for loop, kind in zip(loops, kinds) if kind == "R"])
            sch.parallel(sch.fuse(*spatial))
        return sch


def rules_for(target: Target) -> list[ScheduleRule]:
    """Our ops' rules for the target's kind, then the rules for everything else."""
    from structfx.lowering.ops.btt import BTTCPU, BTTCUDA
    from structfx.lowering.ops.maxplus import MaxPlusCPU, MaxPlusCUDA
    from structfx.lowering.ops.maxplus_pool import MaxPlusPoolCPU, MaxPlusPoolCUDA
    from structfx.lowering.ops.spm import SPMCPU, SPMCUDA, SPMCoefficientsCPU

    if target.kind.name == "cuda":
        gpu = dlight.gpu
        return [MaxPlusCUDA(), MaxPlusPoolCUDA(), SPMCUDA(), BTTCUDA(), gpu.Matmul(), gpu.GEMV(), gpu.Reduction(),
                gpu.GeneralReduction(), gpu.Fallback()]
    return [MaxPlusCPU(), MaxPlusPoolCPU(), SPMCPU(), SPMCoefficientsCPU(), BTTCPU(), GenericCPU()]


def apply_schedules(mod, target: Target):
    """Legalize every Relax op to TIR, then schedule each PrimFunc with the first rule that applies."""
    from structfx.lowering.compat import relax

    with target:
        mod = relax.transform.LegalizeOps()(mod)
        return dlight.ApplyDefaultSchedule(*rules_for(target))(mod)
