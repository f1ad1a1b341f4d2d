"""Rule BTT: dense layers (nn.Linear, F.linear, Conv1D) -> BTTLinear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from structfx.nn import BTTLinear
from structfx.passes.registry import register_rule
from structfx.passes.rules.base import Rule, check_at_least
from structfx.passes.rules.placement import placed, site_placement
from structfx.passes.sites import Site, dense_parameters


@dataclass(frozen=True)
class BTT(Rule):
    """Block tensor-train of rank ``rank``; ``init="svd"``: per-block truncated SVD of the trained weight
    (the optimal BTT; exact at full rank), ``"random"``: from scratch, drawn from ``seed`` (the bias is kept)."""

    rank: int = 1
    init: Literal["svd", "random"] = "svd"
    kind: ClassVar = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "rank", 1)


@register_rule(BTT)
def dense_to_btt(rule: BTT, site: Site) -> nn.Module:
    weight, bias = dense_parameters(site.module)
    site_placement(site)  # refuses dtypes structfx layers do not compute in
    bias = None if bias is None else bias.detach()
    if rule.init == "svd":
        return placed(BTTLinear.from_dense(weight.detach(), bias, rule.rank), site)
    layer = BTTLinear(weight.shape[1], weight.shape[0], rule.rank, bias is not None, generator=rule.generator(site))
    if bias is not None:
        layer.bias.data.copy_(bias)
    return placed(layer, site)
