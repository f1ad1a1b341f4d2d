"""torch.export -> TVM Relax, with our ops lowered to our own TE kernels and schedules."""

from structfx.lowering.build import compile
from structfx.lowering.compiled import CompiledModel
from structfx.lowering.tuning import tune

__all__ = ["CompiledModel", "compile", "tune"]
