"""Rule SPM: dense layers (nn.Linear, F.linear, Conv1D) -> SPMLinear, fitted to the trained weight."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from structfx.nn import SPMLinear
from structfx.nn.fitting import FitJob, fit_many
from structfx.passes.cost import LayerCost
from structfx.passes.rules.base import Rule, check_at_least
from structfx.passes.rules.placement import placed, site_placement
from structfx.passes.sites import Site, dense_parameters

#: The learning rate of the fit (on inputs and targets scaled to RMS 1).
LEARNING_RATE = 0.1

#: Layers fitted together by the prefit, until the rewrite takes them: module -> (rule, fitted layer).
_FITTED: weakref.WeakKeyDictionary[nn.Module, tuple[Rule, SPMLinear]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SPM(Rule):
    """Stagewise pairwise mixing; ``stages=None`` means log2 N (butterfly). The layer is fitted with at
    most ``fit_steps`` Adam steps on the layer's recorded inputs (calibration, else the example inputs
    topped up with Gaussian rows), stopping early when the error stops falling; the model's module layers
    are fitted together. ``fit_steps=0`` keeps the random init (scaled to the weight). ``progress=False``
    hides the progress bar. Random angles, pairings and rows come from ``seed``."""

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


def fit_together(rule: SPM, sites: list[Site]) -> None:
    jobs = [_fit_job(rule, site) for site in sites]
    fit_many(jobs, rule.fit_steps, LEARNING_RATE, rule.progress)
    for site, job in zip(sites, jobs):
        _FITTED[site.module] = (rule, job.layer)


def dense_to_spm(rule: SPM, site: Site) -> nn.Module:
    fitted = _FITTED.pop(site.module, None)
    if fitted is not None and fitted[0] == rule:
        return placed(fitted[1], site)
    job = _fit_job(rule, site)
    fit_many([job], rule.fit_steps, LEARNING_RATE, rule.progress, f"fitting SPM {site.name}")
    return placed(job.layer, site)


def _fit_job(rule: SPM, site: Site) -> FitJob:
    weight, bias = dense_parameters(site.module)
    site_placement(site)  # refuses dtypes structfx layers do not compute in
    generator = rule.generator(site)
    layer = SPMLinear(weight.shape[1], weight.shape[0], rule.variant, rule.stages, rule.pairing,
                      bias is not None, rule.seed, generator)
    rows = [s.reshape(-1, weight.shape[1]) for s in site.samples if s.numel() > 0]
    inputs = torch.cat(rows).cpu() if rows else None
    if inputs is not None and len(inputs) < weight.shape[1]:
        extra = torch.randn(weight.shape[1] - len(inputs), weight.shape[1], generator=generator) * inputs.std()
        inputs = torch.cat([inputs, extra])  # too few rows would let the fit overfit a few directions
    return FitJob(layer, weight.detach(), None if bias is None else bias.detach(), inputs, generator)


def spm_cost(layer: SPMLinear) -> LayerCost:
    """2 N L multiply-adds per row (N the width, L the stages)."""
    width = max(layer.in_features, layer.out_features)
    return LayerCost(2 * layer.width * layer.stages, "" if layer.width == width else f"width {width}->{layer.width}")
