"""Rule BTT: dense layers (nn.Linear, F.linear, Conv1D) -> BTTLinear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from structfx.nn import BTTLinear
from structfx.passes.cost import LayerCost
from structfx.passes.registry import SkipSite
from structfx.passes.rules.base import Rule, check_at_least
from structfx.passes.rules.placement import placed, site_placement
from structfx.passes.sites import Site, dense_parameters


@dataclass(frozen=True)
class BTT(Rule):
    """Block tensor-train of rank ``rank``; ``init="svd"``: per-block truncated SVD of the trained weight
    (the optimal BTT; exact at full rank), ``"random"``: from scratch, drawn from ``seed`` (the bias is kept).
    A layer where a rank below the blocks' full rank would take no fewer multiply-adds than the dense layer
    (a 64 x 64 layer at rank 4) is skipped, with the reason in the report."""

    rank: int = 1
    init: Literal["svd", "random"] = "svd"
    kind: ClassVar = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "rank", 1)


def dense_to_btt(rule: BTT, site: Site) -> nn.Module:
    weight, bias = dense_parameters(site.module)
    site_placement(site)  # refuses dtypes structfx layers do not compute in
    bias = None if bias is None else bias.detach()
    if rule.init == "svd":
        layer = BTTLinear.from_dense(weight.detach(), bias, rule.rank)
    else:
        layer = BTTLinear(weight.shape[1], weight.shape[0], rule.rank, bias is not None, generator=rule.generator(site))
        if bias is not None:
            layer.bias.data.copy_(bias)
    _check_saving(layer, weight.numel())
    return placed(layer, site)


def _check_saving(layer: BTTLinear, dense_ops: int) -> None:
    """Skip a BTT below its blocks' full rank that takes no fewer multiply-adds than the dense layer: it would
    lose accuracy for nothing (a 64 x 64 layer at rank 4). At full rank it is exact, a choice the user made."""
    m0, _, _, n1 = layer.blocks
    ops = btt_cost(layer).multiply_adds
    if layer.rank < min(m0, n1) and ops >= dense_ops:
        raise SkipSite(
            f"BTT(rank={layer.rank}) takes {ops} multiply-adds a row here, no fewer than the dense layer's "
            f"{dense_ops}: it would lose accuracy and save nothing (a lower rank would save)"
        )


def btt_cost(layer: BTTLinear) -> LayerCost:
    """r (n0 n_in + m1 n_out) multiply-adds per row, on the padded sizes."""
    m0, m1, n0, n1 = layer.blocks
    notes = []
    if layer.padded_in != layer.in_features:
        notes.append(f"in {layer.in_features}->{layer.padded_in}")
    if layer.padded_out != layer.out_features:
        notes.append(f"out {layer.out_features}->{layer.padded_out}")
    return LayerCost(layer.rank * (n0 * layer.padded_in + m1 * layer.padded_out), ", ".join(notes))
