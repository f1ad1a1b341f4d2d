"""Rule SPM: dense layers (nn.Linear, F.linear, Conv1D) -> SPMLinear, fitted to the trained weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from structfx.nn import SPMLinear
from structfx.passes.registry import register_rule
from structfx.passes.rules.base import Rule, check_at_least
from structfx.passes.rules.placement import placed, site_placement
from structfx.passes.sites import Site, dense_parameters


@dataclass(frozen=True)
class SPM(Rule):
    """Stagewise pairwise mixing; ``stages=None`` means log2 N (butterfly). The layer is fitted with at
    most ``fit_steps`` Adam steps on the layer's recorded inputs (calibration, else the example inputs
    topped up with Gaussian rows), stopping early when the error stops falling; ``fit_steps=0`` keeps the
    random init (scaled to the weight). ``progress=False`` hides the per-layer progress bar. Random
    angles, pairings and rows come from ``seed``."""

    variant: Literal["orthogonal", "general"] = "orthogonal"
    stages: int | None = None
    pairing: Literal["butterfly", "random"] = "butterfly"
    fit_steps: int = 300
    progress: bool = True
    kind: ClassVar = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "stages", 1, " (None picks log2 N)")
        check_at_least(self, "fit_steps", 0, " (0 keeps the random init)")


@register_rule(SPM)
def dense_to_spm(rule: SPM, site: Site) -> nn.Module:
    weight, bias = dense_parameters(site.module)
    site_placement(site)  # refuses dtypes structfx layers do not compute in
    generator = rule.generator(site)
    rows = [s.reshape(-1, weight.shape[1]) for s in site.samples if s.numel() > 0]
    inputs = torch.cat(rows).cpu() if rows else None
    if inputs is not None and len(inputs) < weight.shape[1]:
        extra = torch.randn(weight.shape[1] - len(inputs), weight.shape[1], generator=generator) * inputs.std()
        inputs = torch.cat([inputs, extra])  # too few rows would let the fit overfit a few directions
    layer, _ = SPMLinear.from_dense(
        weight.detach(), None if bias is None else bias.detach(), variant=rule.variant, stages=rule.stages,
        pairing=rule.pairing, inputs=inputs, steps=rule.fit_steps, seed=rule.seed, generator=generator,
        progress=rule.progress, description=f"fitting SPM {site.name}",
    )
    return placed(layer, site)
