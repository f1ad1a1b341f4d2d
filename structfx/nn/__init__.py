"""The structured layers: plain trainable modules, each backed by one ``torch.ops.structfx`` custom op."""

from structfx.nn.btt import BTTLinear
from structfx.nn.inplace import InPlace
from structfx.nn.maxplus import ChannelMaxPlus, SparseMaxPlus
from structfx.nn.maxplus_pool import MaxPlusPool2d
from structfx.nn.spm import SPMLinear

__all__ = ["BTTLinear", "ChannelMaxPlus", "InPlace", "MaxPlusPool2d", "SPMLinear", "SparseMaxPlus"]
