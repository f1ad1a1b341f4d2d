"""Rule MaxPlus: ReLU in every spelling -> SparseMaxPlus (ChannelMaxPlus on conv feature maps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from structfx.errors import StructfxError
from structfx.nn import ChannelMaxPlus, SparseMaxPlus
from structfx.passes.cost import LayerCost
from structfx.passes.registry import SkipSite
from structfx.passes.rules.base import Rule, check_at_least
from structfx.passes.rules.placement import placed
from structfx.passes.sites import Site


@dataclass(frozen=True)
class MaxPlus(Rule):
    """Sparse max-plus with ``k`` finite weights per output, same width as the ReLU it replaces.
    ``init="relu"`` keeps the function exactly; ``"paper"`` is the paper's random init. The inactive
    indices (and the "paper" weights) are drawn from ``seed``."""

    k: int = 2
    init: Literal["relu", "paper"] = "relu"
    kind: ClassVar = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "k", 1)


def relu_to_maxplus(rule: MaxPlus, site: Site) -> nn.Module:
    """A ReLU mixes its input's channel axis (``site.channel_axis``, from the producer): dim 1 of a feature
    map (N, C, *spatial) becomes a ChannelMaxPlus, the last dim a SparseMaxPlus."""
    shape, axis = site.input_shape, site.channel_axis
    if shape is None or len(shape) < 2:
        raise SkipSite(f"input shape {shape} has no channel axis beside the batch")
    axis = len(shape) - 1 if axis is None else axis
    if axis not in (1, len(shape) - 1):
        raise SkipSite(f"channels at dim {axis} of {tuple(shape)}: neither dim 1 nor the last")
    features = site.features
    if rule.k > features:
        raise StructfxError(
            f"MaxPlus(k={rule.k}) exceeds the in_features={features} of {site.place}: choose k <= {features} "
            f"or keep small layers out with min_features / filter_fn"
        )
    layer_type = SparseMaxPlus if axis == len(shape) - 1 else ChannelMaxPlus
    return placed(layer_type(features, features, rule.k, init=rule.init, generator=rule.generator(site)), site)


def maxplus_cost(layer: SparseMaxPlus) -> LayerCost:
    """k add-max pairs per output and feature vector."""
    return LayerCost(layer.k * layer.out_features)
