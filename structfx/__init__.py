"""structfx: swap the costly parts of a trained PyTorch model for structured layers, then compile them.

Attributes load lazily (PEP 562), so that ``structfx.runtime`` can run a compiled artifact on a machine
with the TVM runtime alone: importing it never imports torch, the compiler or the op registry (which the
runtime's bundle leaves out). Every registered op's rule and layers are attributes too (``structfx.ops``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "StructfxError": "structfx.errors",
    "Report": "structfx.passes",
    "report": "structfx.passes",
    "transform": "structfx.passes",
    "CompiledModel": "structfx.lowering",
    "compile": "structfx.lowering",
    "tune": "structfx.lowering",
}


def _public() -> list[str]:
    from structfx.registry import public_names

    return sorted([*_EXPORTS, *public_names("rule"), *public_names("layers"), "__version__"])


def __getattr__(name: str):
    if name == "__all__":
        return _public()
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    from structfx.registry import export, public_names

    return export(__name__, name, "rule" if name in public_names("rule") else "layers")


def __dir__() -> list[str]:
    return _public()
