"""SPM, stagewise pairwise mixing: ``y = D_out B_L ... B_1 D_in x + b`` (ops.md section 3).

Width N is the next power of two; x is zero-padded to N and the first n_out outputs kept. Each stage B_l
mixes N/2 disjoint pairs (p, q) by a 2x2 matrix: a rotation by theta ("orthogonal", N/2 parameters) or
[[a, b], [c, d]] ("general", 2N parameters). Cost: 2 N L multiply-adds per row instead of n_in n_out.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.nn.spm_pairing import Pairing, default_stages, spm_width, stage_permutations

Variant = Literal["orthogonal", "general"]


@functools.lru_cache(maxsize=64)
def _gathers(width: int, stages: int, pairing: Pairing, seed: int) -> tuple[np.ndarray, ...]:
    """Index tables that move h from one stage's pair order to the next, without a natural-order detour.

    In stage l's pair order, positions (2i, 2i+1) hold pair i. ``into[l]`` gathers stage l's pair order
    from stage l-1's (from natural order for l = 0); ``back[l]`` is its inverse; ``out`` returns from the
    last stage's pair order to natural order and ``last`` is its inverse.
    """
    perms = stage_permutations(width, stages, pairing, seed)
    inverse = np.argsort(perms, axis=1)
    previous = np.concatenate([np.arange(width)[None], inverse[:-1]])
    into = np.take_along_axis(previous, perms, axis=1)
    return into, np.argsort(into, axis=1), inverse[-1], perms[-1]


def _matrices(coeffs: Tensor, variant: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 2x2 entries (a, b, c, d) of every pair, each (L, N/2)."""
    if variant == "orthogonal":
        cos, sin = torch.cos(coeffs), torch.sin(coeffs)
        return cos, -sin, sin, cos
    if variant == "general":
        return coeffs.unbind(1)
    raise StructfxError(f"SPM variant={variant!r} is unknown; use 'orthogonal' or 'general'")


def _mix(h: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """One stage on rows in pair order: [h_p, h_q] <- [[a, b], [c, d]] [h_p, h_q]."""
    u, v = h.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * u + b * v, c * u + d * v], dim=-1).flatten(-2)


def _mixing_input(x: Tensor, d_in: Tensor) -> Tensor:
    return F.pad(x.reshape(-1, x.shape[-1]), (0, d_in.shape[0] - x.shape[-1])) * d_in


def _run_stages(h: Tensor, coeffs: Tensor, variant: str, tables, keep_inputs: bool = False):
    """All L stages from natural order to natural order; optionally also each stage's input (pair order)."""
    into, _, out, _ = tables
    inputs = []
    for l, (a, b, c, d) in enumerate(zip(*_matrices(coeffs, variant))):
        h = h.index_select(-1, into[l])
        if keep_inputs:
            inputs.append(h)
        h = _mix(h, a, b, c, d)
    return h.index_select(-1, out), inputs


def _tables(coeffs: Tensor, width: int, pairing: str, seed: int) -> tuple[Tensor, ...]:
    return tuple(torch.as_tensor(t, device=coeffs.device) for t in _gathers(width, coeffs.shape[0], pairing, seed))


@torch.library.custom_op("structfx::spm", mutates_args=())
def spm(
    x: Tensor, d_in: Tensor, coeffs: Tensor, d_out: Tensor, bias: Tensor | None,
    variant: str, pairing: str, seed: int, out_features: int,
) -> Tensor:
    """SPM on x (..., n_in): coeffs are angles (L, N/2) or 2x2 entries (L, 4, N/2)."""
    h0 = _mixing_input(x, d_in)
    h, _ = _run_stages(h0, coeffs, variant, _tables(coeffs, d_in.shape[0], pairing, seed))
    y = (h * d_out)[:, :out_features]
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], out_features)


@spm.register_fake
def _(x, d_in, coeffs, d_out, bias, variant, pairing, seed, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, d_in, coeffs, d_out, bias, variant, pairing, seed, out_features = inputs
    ctx.structure = (variant, pairing, seed)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, d_in, coeffs, d_out)


def _backward(ctx, grad: Tensor):
    """Closed-form backward (ops.md). Orthogonal: each stage's input is recomputed from its output by the
    inverse rotation, so the extra memory is O(N) per row; general: stage inputs are recomputed and kept."""
    x, d_in, coeffs, d_out = ctx.saved_tensors
    variant, pairing, seed = ctx.structure
    width = d_in.shape[0]
    _, back, _, last = tables = _tables(coeffs, width, pairing, seed)
    h0 = _mixing_input(x, d_in)
    h_last, inputs = _run_stages(h0, coeffs, variant, tables, keep_inputs=variant == "general")

    g_y = F.pad(grad.reshape(-1, grad.shape[-1]), (0, width - grad.shape[-1]))
    grad_d_out = (g_y * h_last).sum(0)
    g = (g_y * d_out).index_select(-1, last)  # into the last stage's pair order
    h = h_last.index_select(-1, last)
    a, b, c, d = _matrices(coeffs, variant)
    grad_coeffs = []
    for l in reversed(range(coeffs.shape[0])):
        h = inputs[l] if variant == "general" else _mix(h, a[l], c[l], b[l], d[l])  # R^T undoes R
        g_u, g_v = g.unflatten(-1, (-1, 2)).unbind(-1)
        u, v = h.unflatten(-1, (-1, 2)).unbind(-1)
        if variant == "general":
            grad_coeffs.append(torch.stack([(g_u * u).sum(0), (g_u * v).sum(0), (g_v * u).sum(0), (g_v * v).sum(0)]))
        else:
            grad_coeffs.append((g_u * (b[l] * u - a[l] * v) + g_v * (a[l] * u + b[l] * v)).sum(0))
        g = _mix(g, a[l], c[l], b[l], d[l]).index_select(-1, back[l])
        if variant == "orthogonal":
            h = h.index_select(-1, back[l])
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
            stage = torch.zeros(self.width, self.width, dtype=matrix.dtype)
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
        lr: float = 0.02,
        seed: int = 0,
        progress: bool = False,
    ) -> tuple[SPMLinear, float]:
        """Fit an SPM to ``x -> x W^T + bias`` on ``inputs`` (default: Gaussian) with Adam.

        There is no closed form, and an O(N log N) map cannot match a generic dense W: the relative error
        ``||SPM(X) - X W^T|| / ||X W^T||`` on the sample inputs is returned beside the layer.
        """
        from structfx.nn.fitting import fit_to_dense

        out_features, in_features = weight.shape
        generator = torch.Generator().manual_seed(seed)
        layer = cls(in_features, out_features, variant, stages, pairing, bias is not None, seed, generator)
        return layer, fit_to_dense(layer, weight, bias, inputs, steps, lr, generator, progress)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, variant={self.variant}, "
            f"stages={self.stages}, pairing={self.pairing}, width={self.width}, bias={self.bias is not None}"
        )
