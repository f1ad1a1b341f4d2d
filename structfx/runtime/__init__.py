"""Run a saved artifact with the TVM runtime and numpy alone: ``structfx.runtime.load(dir)``."""

from structfx.runtime.loader import Runtime, load

__all__ = ["Runtime", "load"]
