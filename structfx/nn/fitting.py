"""Fitting a structured layer to a trained dense one when no closed form exists (SPM)."""

from __future__ import annotations

import contextlib
import math

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from structfx.errors import StructfxError

#: The plateau rule: every PLATEAU_WINDOW steps, stop when the relative error fell by less than
#: PLATEAU_GAIN of itself over that window (past MIN_STEPS).
PLATEAU_WINDOW = 25
PLATEAU_GAIN = 0.01
MIN_STEPS = 50


def sample_inputs(in_features: int, inputs: Tensor | None, generator: torch.Generator) -> Tensor:
    """The rows to fit on (float32 unless float64): the caller's recorded inputs, else Gaussian rows
    (enough to see every direction)."""
    if inputs is None or inputs.numel() == 0:
        rows = max(256, min(2 * in_features, 2048))
        return torch.randn(rows, in_features, generator=generator)
    if inputs.shape[-1] != in_features:
        raise StructfxError(
            f"sample inputs have {inputs.shape[-1]} features but the layer takes {in_features}: "
            f"pass inputs of shape (..., {in_features})"
        )
    rows = inputs.detach().reshape(-1, in_features)
    return rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)


def compressed_rows(x: Tensor) -> Tensor:
    """At most ``in_features`` rows R with R^T R = X^T X (QR's R): every ``||A X^T||`` is unchanged, so a
    fit on R is the fit on X, at a cost that no longer grows with the number of recorded rows."""
    if x.shape[0] <= x.shape[1]:
        return x
    return torch.linalg.qr(x, mode="r").R


def relative_error(new: Tensor, old: Tensor) -> float | None:
    """``||new - old|| / ||old||`` in float64; None when nothing was compared (no elements), 0 when both
    are 0 and inf when only ``old`` is."""
    if old.numel() == 0:
        return None
    new, old = new.detach().double(), old.detach().double()
    difference, scale = float((new - old).norm()), float(old.norm())
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else math.inf


def fit_to_dense(
    layer: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    inputs: Tensor | None,
    steps: int,
    lr: float,
    generator: torch.Generator,
    progress: bool,
    description: str = "fitting SPM",
) -> float | None:
    """Minimise ``||layer(X) - X W^T||`` with Adam, in float32 (float64 for a float64 weight); the bias is
    copied, not fitted. ``layer`` must have a ``d_out`` output scale (SPM's): the fit runs on the target
    divided by its RMS, so that one learning rate suits every weight scale, and d_out takes the scale back.

    Stops after ``steps`` steps or on a plateau of the relative error (PLATEAU_GAIN over PLATEAU_WINDOW
    steps). Returns the relative error on the fitting rows (None when there were none).
    """
    x = sample_inputs(weight.shape[1], inputs, generator).to(weight.device)
    layer.to(device=weight.device, dtype=x.dtype)
    rows = compressed_rows(x)
    target = rows @ weight.detach().to(x.dtype).T
    scale = float(target.pow(2).mean().sqrt()) or 1.0
    target = target / scale
    fitted = [p for name, p in layer.named_parameters() if name != "bias"]
    if layer.bias is not None:
        layer.bias.data.zero_()
    optimizer = torch.optim.Adam(fitted, lr=lr)
    history: list[float] = []
    with _progress_bar(progress, description, steps) as advance:
        for step in range(steps):
            optimizer.zero_grad()
            loss = (layer(rows) - target).pow(2).mean()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()) ** 0.5)
            advance(history[-1])
            if step + 1 >= MIN_STEPS and (step + 1) % PLATEAU_WINDOW == 0:
                if history[-1] > (1 - PLATEAU_GAIN) * history[-1 - PLATEAU_WINDOW]:
                    break
    with torch.no_grad():
        layer.d_out.mul_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        reference = x @ weight.detach().to(x.dtype).T
        return relative_error(layer(x), reference if bias is None else reference + layer.bias)


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, steps: int):
    """A transient rich progress bar showing the current error; yields ``advance(error)``."""
    if not enabled or steps == 0:
        yield lambda error: None
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("rel. error {task.fields[error]:.3f}"), TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=steps, error=float("nan"))
        yield lambda error: bar.update(task, advance=1, error=error)
