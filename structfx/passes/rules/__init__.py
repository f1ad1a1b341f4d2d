"""The rules of ``structfx.transform``: one frozen dataclass per file, each registered with its builder.

A new op is one file here and one line below.
"""

from structfx.passes.rules.base import Rule
from structfx.passes.rules.btt import BTT
from structfx.passes.rules.maxplus import MaxPlus
from structfx.passes.rules.maxplus_pool import MaxPlusPool
from structfx.passes.rules.spm import SPM

__all__ = ["BTT", "SPM", "MaxPlus", "MaxPlusPool", "Rule"]
