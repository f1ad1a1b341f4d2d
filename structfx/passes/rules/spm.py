"""Rule SPM: dense layers (nn.Linear, F.linear, Conv1D) -> SPMLinear, fitted to the trained weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from structfx.nn import SPMLinear
from structfx.passes.registry import register_rule
from structfx.passes.rules.base import Rule, check_choice, check_positive
from structfx.passes.sites import Site, dense_parameters


@dataclass(frozen=True)
class SPM(Rule):
    """Stagewise pairwise mixing; ``stages=None`` means log2 N (butterfly). The layer is fitted with
    ``fit_steps`` Adam steps on the layer's recorded inputs (calibration, else the example inputs
    topped up with Gaussian rows); ``fit_steps=0`` keeps the random init."""

    variant: Literal["orthogonal", "general"] = "orthogonal"
    stages: int | None = None
    pairing: Literal["butterfly", "random"] = "butterfly"
    fit_steps: int = 300
    kind: ClassVar = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "variant", self.variant, ("orthogonal", "general"))
        check_choice(self, "pairing", self.pairing, ("butterfly", "random"))
        check_positive(self, "stages", self.stages, allow_none=True)
        if not isinstance(self.fit_steps, int) or self.fit_steps < 0:
            check_positive(self, "fit_steps", self.fit_steps)


@register_rule(SPM)
def dense_to_spm(rule: SPM, site: Site) -> nn.Module:
    weight, bias = dense_parameters(site.module)
    inputs = torch.cat([s.reshape(-1, weight.shape[1]) for s in site.samples]) if site.samples else None
    if inputs is not None and len(inputs) < weight.shape[1]:
        extra = torch.randn(weight.shape[1] - len(inputs), weight.shape[1]) * inputs.std()
        inputs = torch.cat([inputs, extra])  # too few rows would let the fit overfit a few directions
    layer, _ = SPMLinear.from_dense(
        weight.detach(), None if bias is None else bias.detach(), variant=rule.variant, stages=rule.stages,
        pairing=rule.pairing, inputs=inputs, steps=rule.fit_steps, progress=rule.fit_steps > 0,
    )
    return layer
