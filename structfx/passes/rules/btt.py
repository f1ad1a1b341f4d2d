"""Rule BTT: dense layers (nn.Linear, F.linear, Conv1D) -> BTTLinear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from structfx.nn import BTTLinear
from structfx.passes.registry import register_rule
from structfx.passes.rules.base import Rule, check_choice, check_positive
from structfx.passes.sites import Site, dense_parameters


@dataclass(frozen=True)
class BTT(Rule):
    """Block tensor-train of rank ``rank``; ``init="svd"``: per-block truncated SVD of the trained weight
    (the optimal BTT), ``"random"``: from scratch (the bias is kept)."""

    rank: int = 1
    init: Literal["svd", "random"] = "svd"
    kind: ClassVar = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "rank", self.rank)
        check_choice(self, "init", self.init, ("svd", "random"))


@register_rule(BTT)
def dense_to_btt(rule: BTT, site: Site) -> nn.Module:
    weight, bias = dense_parameters(site.module)
    if rule.init == "svd":
        return BTTLinear.from_dense(weight.detach(), None if bias is None else bias.detach(), rule.rank)
    layer = BTTLinear(weight.shape[1], weight.shape[0], rule.rank, bias is not None)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    return layer
