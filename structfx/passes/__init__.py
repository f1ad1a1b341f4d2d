"""torch.fx rewrites that put structured layers into models: ``transform`` and its ``report``.

Every registered op's rule (``structfx.ops``) is an attribute here, imported on first use.
"""

from structfx.passes.report import Report, report
from structfx.passes.rules.base import Rule
from structfx.passes.transform import transform
from structfx.registry import export, public_names

__all__ = ["Report", "Rule", "report", "transform", *public_names("rule")]


def __getattr__(name: str):
    return export(__name__, name, "rule")


def __dir__() -> list[str]:
    return sorted(__all__)
