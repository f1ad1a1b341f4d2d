"""torch.fx rewrites that put structured layers into models: ``transform`` and its ``report``."""

from structfx.passes.report import Report, report
from structfx.passes.rules import BTT, SPM, MaxPlus, MaxPlusPool, Rule
from structfx.passes.transform import transform

__all__ = ["BTT", "SPM", "MaxPlus", "MaxPlusPool", "Report", "Rule", "report", "transform"]
