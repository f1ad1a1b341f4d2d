"""Fitting SPM layers to trained dense ones, several at once, when no closed form exists.

Each layer minimises its relative error ``||SPM(X) - X W^T|| / ||X W^T||`` on its rows with Adam.
Layers of one structure (sizes, variant, stages, pairing) are fitted together: their parameters are
stacked and every stage runs once for all of them, so that a model's dozens of small layers cost about
what one does (Adam is elementwise, so this is the same optimisation as fitting each alone).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from structfx.errors import StructfxError
from structfx.nn.spm import SPMLinear, _matrices, _mix, _stages

#: The plateau rule: every PLATEAU_WINDOW steps (past MIN_STEPS), stop when no layer's relative error
#: fell by PLATEAU_GAIN of itself over that window.
PLATEAU_WINDOW = 25
PLATEAU_GAIN = 0.01
MIN_STEPS = 50
#: Stacked fits whose stage tensors have at most this many elements run on one thread: their ops are too
#: small to share, and on a busy host two threads made 24 layers of width 64 ten times slower (11 s of CPU
#: against 1.1 s for 100 steps).
SINGLE_THREAD_ELEMENTS = 1 << 20


@dataclass
class FitJob:
    """One layer to fit: ``layer`` is changed in place to approximate ``x -> x W^T + bias``."""

    layer: SPMLinear
    weight: Tensor  # (out_features, in_features)
    bias: Tensor | None
    inputs: Tensor | None  # (..., in_features) rows to fit on; None: Gaussian rows
    generator: torch.Generator  # draws the Gaussian rows


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
    """Exactly ``in_features`` rows R with R^T R = X^T X (QR's R, or X padded with zero rows): every
    ``||A X^T||`` is unchanged, so a fit on R is the fit on X at a cost that does not grow with X."""
    if x.shape[0] <= x.shape[1]:
        return F.pad(x, (0, 0, 0, x.shape[1] - x.shape[0]))
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
    layer: SPMLinear,
    weight: Tensor,
    bias: Tensor | None,
    inputs: Tensor | None,
    steps: int,
    lr: float,
    generator: torch.Generator,
    progress: bool,
    description: str = "fitting SPM",
) -> float | None:
    """``fit_many`` for one layer; returns its relative error on its rows."""
    return fit_many([FitJob(layer, weight, bias, inputs, generator)], steps, lr, progress, description)[0]


def fit_many(
    jobs: list[FitJob], steps: int, lr: float, progress: bool, description: str = "fitting SPM"
) -> list[float | None]:
    """Fit every job's layer (at most ``steps`` Adam steps, fewer on a plateau), in float32 (float64 for
    float64 weights) on the weight's device; biases are copied, not fitted. Returns each layer's relative
    error ``||layer(X) - X W^T - b|| / ||X W^T + b||`` on its rows."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        layer = job.layer
        key = (layer.in_features, layer.out_features, layer.variant, layer.stages, layer.pairing, layer.seed,
               job.weight.dtype == torch.float64, job.weight.device)
        groups.setdefault(key, []).append(index)
    errors: list[float | None] = [None] * len(jobs)
    for members in groups.values():
        label = description if len(members) == 1 else f"{description} ({len(members)} layers)"
        for index, error in zip(members, _fit_group([jobs[i] for i in members], steps, lr, progress, label)):
            errors[index] = error
    return errors


def _fit_group(jobs: list[FitJob], steps: int, lr: float, progress: bool, description: str) -> list[float | None]:
    """Layers of one structure: inputs normalised to RMS 1 and targets to RMS 1 per layer (one learning
    rate suits every scale; d_out takes each target's scale back at the end)."""
    first = jobs[0].layer
    device = jobs[0].weight.device
    xs = [sample_inputs(first.in_features, job.inputs, job.generator).to(device) for job in jobs]
    dtype = xs[0].dtype if all(x.dtype == xs[0].dtype for x in xs) else torch.float32
    xs = [x.to(dtype) for x in xs]
    rows = torch.stack([_unit_rms(compressed_rows(x)) for x in xs])  # (G, in, in)
    weights = torch.stack([job.weight.detach().to(device=device, dtype=dtype) for job in jobs])
    targets = rows @ weights.transpose(1, 2)
    scales = targets.pow(2).mean((1, 2)).sqrt().clamp_min(torch.finfo(dtype).tiny)
    targets = targets / scales[:, None, None]
    norms = targets.pow(2).sum((1, 2)).clamp_min(torch.finfo(dtype).tiny)
    params = [torch.stack([getattr(job.layer, name).detach() for job in jobs]).to(device=device, dtype=dtype)
              .requires_grad_() for name in ("d_in", "coeffs", "d_out")]
    optimizer = torch.optim.Adam(params, lr=lr)
    stages = _stages(first.width, first.stages, first.pairing, first.seed)
    history: list[Tensor] = []
    small = rows.shape[0] * rows.shape[1] * first.width <= SINGLE_THREAD_ELEMENTS
    with _progress_bar(progress, description, steps) as advance, _threads(1 if small else torch.get_num_threads()):
        for step in range(steps):
            optimizer.zero_grad()
            outputs = _stacked_forward(rows, *params, first.variant, stages, first.out_features)
            squared = (outputs - targets).pow(2).sum((1, 2)) / norms  # each layer's relative error, squared
            squared.sum().backward()
            optimizer.step()
            history.append(squared.detach().sqrt())
            advance(float(history[-1].max()))
            if step + 1 >= MIN_STEPS and (step + 1) % PLATEAU_WINDOW == 0:
                if bool((history[-1] > (1 - PLATEAU_GAIN) * history[-1 - PLATEAU_WINDOW]).all()):
                    break
    return [_finish(job, x, d_in, coeffs, d_out * scale)
            for job, x, d_in, coeffs, d_out, scale in zip(jobs, xs, *params, scales)]


def _unit_rms(rows: Tensor) -> Tensor:
    rms = float(rows.pow(2).mean().sqrt())
    return rows / rms if rms > 0 else rows


def _stacked_forward(rows, d_in, coeffs, d_out, variant: str, stages, out_features: int) -> Tensor:
    """SPM of G layers at once on (G, R, in) rows, without bias, in plain differentiable torch ops."""
    h = F.pad(rows, (0, d_in.shape[-1] - rows.shape[-1])) * d_in[:, None, :]
    # angles (G, L, N/2) or 2x2 entries (G, L, 4, N/2) -> a, b, c, d, each (G, L, N/2)
    a, b, c, d = coeffs.unbind(-2) if variant == "general" else _matrices(coeffs, variant)
    for index, stage in enumerate(stages):
        h = _mix(stage, h, *(m[:, index, None, :] for m in (a, b, c, d)))
    return (h * d_out[:, None, :])[..., :out_features]


def _finish(job: FitJob, x: Tensor, d_in: Tensor, coeffs: Tensor, d_out: Tensor) -> float | None:
    layer = job.layer
    with torch.no_grad():
        layer.to(device=x.device, dtype=x.dtype)
        layer.d_in.copy_(d_in)
        layer.coeffs.copy_(coeffs)
        layer.d_out.copy_(d_out)
        reference = x @ job.weight.detach().to(x.dtype).T
        if job.bias is not None:
            layer.bias.copy_(job.bias.detach())
            reference = reference + layer.bias
        return relative_error(layer(x), reference)


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op thread count for the duration, then the old one back."""
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, steps: int):
    """A transient rich progress bar showing the largest current error; yields ``advance(error)``."""
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
