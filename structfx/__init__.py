"""structfx: swap the costly parts of a trained PyTorch model for structured layers, then compile them."""

from structfx.errors import StructfxError
from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear

__version__ = "0.1.0"

__all__ = ["BTTLinear", "MaxPlusPool2d", "SPMLinear", "SparseMaxPlus", "StructfxError", "__version__"]
