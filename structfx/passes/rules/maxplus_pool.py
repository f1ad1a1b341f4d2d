"""Rule MaxPlusPool: max / avg / adaptive 2-D pooling -> MaxPlusPool2d with se = 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from structfx.errors import StructfxError
from structfx.nn import MaxPlusPool2d
from structfx.passes.cost import LayerCost
from structfx.passes.registry import SkipSite
from structfx.passes.rules.base import Rule
from structfx.passes.rules.placement import placed
from structfx.passes.sites import Site


@dataclass(frozen=True)
class MaxPlusPool(Rule):
    """Max-plus pooling with the pool's geometry and se = 0: exact for max pooling, approximate for
    average pooling (the report gives the error). Adaptive pools are left alone: their window depends on
    the input size, and no fixed window equals them at every size they accept."""

    kind: ClassVar = "pool"


def pool_to_maxplus(rule: MaxPlusPool, site: Site) -> nn.Module:
    if isinstance(site.module, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
        raise SkipSite("adaptive pool: its window depends on the input size, so no fixed max-plus window "
                       "computes it at every size")
    if site.input_shape is None or len(site.input_shape) not in (3, 4):
        raise SkipSite(f"input shape {site.input_shape} is not (N, C, H, W) or (C, H, W)")
    try:
        layer = MaxPlusPool2d.from_module(site.module, site.features, tuple(site.input_shape[-2:]))
    except StructfxError as e:
        raise SkipSite(str(e)) from e
    return placed(layer, site)


def pool_cost(layer: MaxPlusPool2d) -> LayerCost:
    """One add-max pair per window position and output."""
    return LayerCost(layer.se[0].numel())
