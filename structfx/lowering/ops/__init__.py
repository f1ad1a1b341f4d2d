"""One file per structured op: its TE compute, its Relax converter and its schedules."""

from structfx.lowering.ops import btt, maxplus, maxplus_pool, spm

__all__ = ["btt", "maxplus", "maxplus_pool", "spm"]
