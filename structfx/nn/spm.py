"""SPM, stagewise pairwise mixing: ``y = D_out B_L ... B_1 D_in x + b``
(Farag, "Rethinking Dense Linear Transformations: Stagewise Pairwise Mixing", arXiv 2512.23905).

Width N is the next power of two; x is zero-padded to N and the first n_out outputs kept. Each stage B_l
mixes N/2 disjoint pairs (p, q) by a 2x2 matrix: a rotation by theta ("orthogonal", N/2 parameters) or
[[a, b], [c, d]] ("general", 2N parameters). Cost: 2 N L multiply-adds per row instead of n_in n_out.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.nn.owned import owned
from structfx.nn.spm_pairing import Pairing, default_stages, spm_width, stage_permutations

Variant = Literal["orthogonal", "general"]


class _ButterflyStage:
    """Pairs (p, p + s) for p with bit s clear: a reshape, no gather. Pair order is ascending p."""

    def __init__(self, stride: int) -> None:
        self.stride = stride

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        u, v = h.unflatten(-1, (-1, 2, self.stride)).unbind(-2)
        return u.flatten(-2), v.flatten(-2)

    def merge(self, u: Tensor, v: Tensor) -> Tensor:
        pairs = torch.stack([u.unflatten(-1, (-1, self.stride)), v.unflatten(-1, (-1, self.stride))], dim=-2)
        return pairs.flatten(-3)


class _MatchingStage:
    """Arbitrary disjoint pairs (a "random" stage): two gathers to split, one to merge."""

    def __init__(self, perm: np.ndarray) -> None:
        self.p, self.q, self.inverse = perm[0::2], perm[1::2], np.argsort(perm.reshape(-1, 2).T.ravel())

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return h[..., torch.as_tensor(self.p, device=h.device)], h[..., torch.as_tensor(self.q, device=h.device)]

    def merge(self, u: Tensor, v: Tensor) -> Tensor:
        return torch.cat([u, v], dim=-1)[..., torch.as_tensor(self.inverse, device=u.device)]


@functools.lru_cache(maxsize=64)
def _stages(width: int, stages: int, pairing: Pairing, seed: int) -> tuple[_ButterflyStage | _MatchingStage, ...]:
    """Each stage's split into (p entries, q entries) and merge back, both in natural coordinate order."""
    if pairing == "butterfly":
        return tuple(_ButterflyStage(1 << (l % int(math.log2(width)))) for l in range(stages))
    return tuple(_MatchingStage(perm) for perm in stage_permutations(width, stages, pairing, seed))


def _matrices(coeffs: Tensor, variant: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 2x2 entries (a, b, c, d) of every pair, each (L, N/2)."""
    if variant == "orthogonal":
        cos, sin = torch.cos(coeffs), torch.sin(coeffs)
        return cos, -sin, sin, cos
    if variant == "general":
        return coeffs.unbind(1)
    raise StructfxError(f"SPM variant={variant!r} is unknown; use 'orthogonal' or 'general'")


def _mix(stage, h: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """One stage: [h_p, h_q] <- [[a, b], [c, d]] [h_p, h_q] for every pair."""
    u, v = stage.split(h)
    return stage.merge(a * u + b * v, c * u + d * v)


def _mixing_input(x: Tensor, d_in: Tensor) -> Tensor:
    return F.pad(x.reshape(-1, x.shape[-1]), (0, d_in.shape[0] - x.shape[-1])) * d_in


def _run_stages(h: Tensor, coeffs: Tensor, variant: str, stages, keep_inputs: bool = False):
    """All L stages; optionally also each stage's input."""
    inputs = []
    for stage, a, b, c, d in zip(stages, *_matrices(coeffs, variant)):
        if keep_inputs:
            inputs.append(h)
        h = _mix(stage, h, a, b, c, d)
    return h, inputs


@torch.library.custom_op("structfx::spm", mutates_args=())
def spm(
    x: Tensor, d_in: Tensor, coeffs: Tensor, d_out: Tensor, bias: Tensor | None,
    variant: str, pairing: str, seed: int, out_features: int,
) -> Tensor:
    """SPM on x (..., n_in): coeffs are angles (L, N/2) or 2x2 entries (L, 4, N/2)."""
    h0 = _mixing_input(x, d_in)
    h, _ = _run_stages(h0, coeffs, variant, _stages(d_in.shape[0], coeffs.shape[0], pairing, seed))
    y = (h * d_out)[:, :out_features]
    y = y if bias is None else y + bias
    return owned(y.reshape(*x.shape[:-1], out_features))


@spm.register_fake
def _(x, d_in, coeffs, d_out, bias, variant, pairing, seed, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, d_in, coeffs, d_out, bias, variant, pairing, seed, out_features = inputs
    ctx.structure = (variant, pairing, seed)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, d_in, coeffs, d_out)


def _backward(ctx, grad: Tensor):
    """Closed-form backward, per stage and pair: ``dx_p = a g_p + c g_q``, ``dx_q = b g_p + d g_q``,
    ``da = g_p x_p`` (and so on), summed over the batch. Orthogonal: each stage's input is recomputed from
    its output by the inverse rotation R^T, so the extra memory is O(N) per row; general: stage inputs are
    recomputed and kept."""
    x, d_in, coeffs, d_out = ctx.saved_tensors
    variant, pairing, seed = ctx.structure
    width = d_in.shape[0]
    stages = _stages(width, coeffs.shape[0], pairing, seed)
    h, inputs = _run_stages(_mixing_input(x, d_in), coeffs, variant, stages, keep_inputs=variant == "general")

    g_y = F.pad(grad.reshape(-1, grad.shape[-1]), (0, width - grad.shape[-1]))
    grad_d_out = (g_y * h).sum(0)
    g = g_y * d_out
    a, b, c, d = _matrices(coeffs, variant)
    grad_coeffs = []
    for l in reversed(range(coeffs.shape[0])):
        h = inputs[l] if variant == "general" else _mix(stages[l], h, a[l], c[l], b[l], d[l])
        g_u, g_v = stages[l].split(g)
        u, v = stages[l].split(h)
        if variant == "general":
            grad_coeffs.append(torch.stack([(g_u * u).sum(0), (g_u * v).sum(0), (g_v * u).sum(0), (g_v * v).sum(0)]))
        else:
            grad_coeffs.append((g_u * (b[l] * u - a[l] * v) + g_v * (a[l] * u + b[l] * v)).sum(0))
        g = stages[l].merge(a[l] * g_u + c[l] * g_v, b[l] * g_u + d[l] * g_v)
    grad_coeffs = torch.stack(grad_coeffs[::-1])
    n_in = x.shape[-1]
    grad_d_in = (g * F.pad(x.reshape(-1, n_in), (0, width - n_in))).sum(0)
    grad_x = (g * d_in)[:, :n_in].reshape(x.shape)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, grad_d_in, grad_coeffs, grad_d_out, grad_bias, None, None, None, None


spm.register_autograd(_backward, setup_context=_setup_context)


class SPMLinear(nn.Module):
    """Stagewise pairwise mixing, a drop-in for ``nn.Linear(in_features, out_features)``.

    ``y = (D_out B_L ... B_1 D_in pad(x))[:out_features] + b``; stages=None means log2 N for the butterfly
    and the fewest that connect every output to every input for "random" pairing.
    """

    channel_dim: ClassVar[int] = -1  # of the output, (..., features): the features (structfx.passes.axes)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        variant: Variant = "orthogonal",
        stages: int | None = None,
        pairing: Pairing = "butterfly",
        bias: bool = True,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise StructfxError(f"SPMLinear needs positive sizes, got in={in_features}, out={out_features}")
        if variant not in ("orthogonal", "general"):
            raise StructfxError(f"SPM variant={variant!r} is unknown; use 'orthogonal' or 'general'")
        self.in_features, self.out_features = in_features, out_features
        self.variant, self.pairing, self.seed = variant, pairing, seed
        self.width = spm_width(in_features, out_features)
        if stages is None:
            stages = default_stages(self.width, pairing, seed)
        if stages < 1:
            raise StructfxError(f"SPMLinear stages={stages} must be at least 1 (None picks log2 N)")
        stage_permutations(self.width, stages, pairing, seed)  # validates the pairing name early
        self.stages = stages
        angles = (torch.rand(stages, self.width // 2, generator=generator) * 2 - 1) * math.pi
        if variant == "orthogonal":
            self.coeffs = nn.Parameter(angles)
        else:
            self.coeffs = nn.Parameter(torch.stack(_matrices(angles, "orthogonal"), dim=1))
        self.d_in = nn.Parameter(torch.ones(self.width))
        self.d_out = nn.Parameter(torch.ones(self.width))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise StructfxError(f"SPMLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        return torch.ops.structfx.spm(
            x, self.d_in, self.coeffs, self.d_out, self.bias,
            self.variant, self.pairing, self.seed, self.out_features,
        )

    def to_dense(self) -> Tensor:
        """The (out_features, in_features) matrix, built stage by stage from explicit N x N factors."""
        perms = stage_permutations(self.width, self.stages, self.pairing, self.seed)
        matrix = torch.diag(self.d_in)
        for perm, (a, b, c, d) in zip(torch.from_numpy(perms), zip(*_matrices(self.coeffs, self.variant))):
            p, q = perm[0::2], perm[1::2]
            stage = torch.zeros(self.width, self.width, dtype=matrix.dtype, device=matrix.device)
            stage[p, p], stage[p, q], stage[q, p], stage[q, q] = a, b, c, d
            matrix = stage @ matrix
        return (torch.diag(self.d_out) @ matrix)[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        variant: Variant = "orthogonal",
        stages: int | None = None,
        pairing: Pairing = "butterfly",
        inputs: Tensor | None = None,
        steps: int = 300,
        lr: float = 0.1,
        seed: int = 0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        description: str = "fitting SPM",
    ) -> tuple[SPMLinear, float | None]:
        """Fit an SPM to ``x -> x W^T + bias`` on ``inputs`` (default: Gaussian) with Adam, for at most
        ``steps`` steps, stopping early on a plateau of the error (``structfx.nn.fitting``).

        ``seed`` fixes the "random" pairing; ``generator`` (default: seeded by ``seed``) draws the initial
        angles and any Gaussian rows. The fit runs in float32 (float64 for a float64 weight); the layer has
        the weight's dtype and device. There is no closed form, and an O(N log N) map cannot match a generic
        dense W: the relative error ``||SPM(X) - X W^T - b|| / ||X W^T + b||`` on the fitting rows is
        returned beside the layer.
        """
        from structfx.nn.fitting import fit_to_dense

        out_features, in_features = weight.shape
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        layer = cls(in_features, out_features, variant, stages, pairing, bias is not None, seed, generator)
        error = fit_to_dense(layer, weight, bias, inputs, steps, lr, generator, progress, description)
        return layer.to(weight.dtype), error

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, variant={self.variant}, "
            f"stages={self.stages}, pairing={self.pairing}, width={self.width}, bias={self.bias is not None}"
        )
