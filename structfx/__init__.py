"""structfx: swap the costly parts of a trained PyTorch model for structured layers, then compile them."""

from structfx.errors import StructfxError
from structfx.lowering import CompiledModel, compile
from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from structfx.passes import BTT, SPM, MaxPlus, MaxPlusPool, Report, report, transform

__version__ = "0.1.0"

__all__ = [
    "BTT", "SPM", "BTTLinear", "CompiledModel", "MaxPlus", "MaxPlusPool", "MaxPlusPool2d", "Report", "SPMLinear",
    "SparseMaxPlus", "StructfxError", "__version__", "compile", "report", "transform",
]
