"""structfx: swap the costly parts of a trained PyTorch model for structured layers, then compile them.

Attributes load lazily (PEP 562), so that ``structfx.runtime`` can run a compiled artifact on a machine
with the TVM runtime alone: importing it never imports torch or the compiler.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "StructfxError": "structfx.errors",
    "BTTLinear": "structfx.nn",
    "MaxPlusPool2d": "structfx.nn",
    "SPMLinear": "structfx.nn",
    "SparseMaxPlus": "structfx.nn",
    "BTT": "structfx.passes",
    "SPM": "structfx.passes",
    "MaxPlus": "structfx.passes",
    "MaxPlusPool": "structfx.passes",
    "Report": "structfx.passes",
    "report": "structfx.passes",
    "transform": "structfx.passes",
    "CompiledModel": "structfx.lowering",
    "compile": "structfx.lowering",
    "tune": "structfx.lowering",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'structfx' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
