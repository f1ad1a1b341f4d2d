"""Fitting a structured layer to a trained dense one when no closed form exists (SPM)."""

from __future__ import annotations

import torch
from rich.progress import track
from torch import Tensor, nn

from structfx.errors import StructfxError


def sample_inputs(in_features: int, inputs: Tensor | None, generator: torch.Generator) -> Tensor:
    """The rows to fit on: the caller's recorded inputs, else Gaussian rows (enough to see every direction)."""
    if inputs is None:
        rows = max(256, min(2 * in_features, 2048))
        return torch.randn(rows, in_features, generator=generator)
    if inputs.shape[-1] != in_features:
        raise StructfxError(
            f"sample inputs have {inputs.shape[-1]} features but the layer takes {in_features}: "
            f"pass inputs of shape (..., {in_features})"
        )
    return inputs.detach().reshape(-1, in_features).float()


def relative_error(new: Tensor, old: Tensor) -> float:
    """``||new - old|| / ||old||`` (0 when both are 0)."""
    scale = old.norm()
    return float((new - old).norm() / scale) if scale > 0 else float((new - old).norm())


def fit_to_dense(
    layer: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    inputs: Tensor | None,
    steps: int,
    lr: float,
    generator: torch.Generator,
    progress: bool,
) -> float:
    """Minimise ``||layer(X) - X W^T||^2`` with Adam; the bias is copied, not fitted. Returns the error."""
    x = sample_inputs(weight.shape[1], inputs, generator)
    weight = weight.detach().float()
    target = x @ weight.T
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
        target = target + bias.detach()
    fitted = [p for name, p in layer.named_parameters() if name != "bias"]
    optimizer = torch.optim.Adam(fitted, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    scale = target.pow(2).mean().clamp_min(1e-12)
    steps_iter = track(range(steps), description="fitting SPM") if progress else range(steps)
    for _ in steps_iter:
        optimizer.zero_grad()
        loss = (layer(x) - target).pow(2).mean() / scale
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return relative_error(layer(x), target)
