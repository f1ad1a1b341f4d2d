"""BTT, block tensor-train with two cores of rank r
(Qiu et al., "Compute Better Spent: Replacing Dense Layers with Structured Matrices", ICML 2024).

``n_in = m0 * m1`` and ``n_out = n0 * n1``; the weight is an m1 x n0 grid of m0 x n1 blocks of rank <= r:
``W[j0*n1 + j1, i1*m0 + i0] = sum_s W1[i1, i0, j0*r + s] * W2[j0, i1*r + s, j1]``. Two batched matmuls,
``r (n0 n_in + m1 n_out)`` multiply-adds per row: 2 r n^1.5 for a square layer instead of n^2.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.nn.owned import owned


def btt_factors(n: int) -> tuple[int, int, int]:
    """``(small, large, padded)`` with ``small * large = padded >= n``, both as close to sqrt(n) as possible.

    A size whose best split has a factor below sqrt(n)/4 (a prime, 2 * prime, ...) is padded up to the
    nearest size that has a good split: a (1, n) split would cost more than the dense layer.
    """
    padded = n
    while True:
        small = math.isqrt(padded)
        while padded % small:
            small -= 1
        if small >= math.sqrt(n) / 4:
            return small, padded // small, padded
        padded += 1


def _cores(x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, m1*m0) -> (the first core's output permuted for the second (n0, B, m1*r), the (n0, B, n1) result)."""
    m1, m0, rn0 = w1.shape
    n0, batch = w2.shape[0], x.shape[0]
    x1 = x.view(batch, m1, m0).transpose(0, 1)
    z = torch.bmm(x1, w1).view(m1, batch, n0, rn0 // n0)
    z = z.permute(2, 1, 0, 3).reshape(n0, batch, m1 * (rn0 // n0))
    return z, torch.bmm(z, w2)


def _padded_rows(x: Tensor, w1: Tensor) -> Tensor:
    return F.pad(x.reshape(-1, x.shape[-1]), (0, w1.shape[0] * w1.shape[1] - x.shape[-1]))


@torch.library.custom_op("structfx::btt", mutates_args=())
def btt(x: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """BTT on x (..., n_in) with cores w1 (m1, m0, r*n0) and w2 (n0, r*m1, n1)."""
    _, y = _cores(_padded_rows(x, w1), w1, w2)
    y = y.transpose(0, 1).reshape(y.shape[1], y.shape[0] * y.shape[2])[:, :out_features]
    y = y if bias is None else y + bias
    return owned(y.reshape(*x.shape[:-1], out_features))


@btt.register_fake
def _(x, w1, w2, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, w1, w2, bias, out_features = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w1, w2)


def _backward(ctx, grad: Tensor):
    """The two batched matmuls backwards; the first core's output is recomputed rather than kept."""
    x, w1, w2 = ctx.saved_tensors
    m1, m0, rn0 = w1.shape
    n0, rm1, n1 = w2.shape
    rows = _padded_rows(x, w1)
    z, _ = _cores(rows, w1, w2)
    g = F.pad(grad.reshape(-1, grad.shape[-1]), (0, n0 * n1 - grad.shape[-1]))
    batch = rows.shape[0]
    g2 = g.view(batch, n0, n1).transpose(0, 1)
    grad_w2 = torch.bmm(z.transpose(1, 2), g2)
    g_z = torch.bmm(g2, w2.transpose(1, 2)).view(n0, batch, m1, rm1 // m1)
    g_z = g_z.permute(2, 1, 0, 3).reshape(m1, batch, rn0)
    x1 = rows.view(batch, m1, m0).transpose(0, 1)
    grad_w1 = torch.bmm(x1.transpose(1, 2), g_z)
    grad_x = torch.bmm(g_z, w1.transpose(1, 2)).transpose(0, 1).reshape(rows.shape)
    grad_x = grad_x[:, : x.shape[-1]].reshape(x.shape)
    grad_bias = g[:, : grad.shape[-1]].sum(0) if ctx.has_bias else None
    return grad_x, grad_w1, grad_w2, grad_bias, None


btt.register_autograd(_backward, setup_context=_setup_context)


class BTTLinear(nn.Module):
    """Block tensor-train of rank r, a drop-in for ``nn.Linear(in_features, out_features)``.

    Sizes without a near-square factorisation are padded (inputs with zeros, outputs sliced off):
    ``padded_in``/``padded_out`` say by how much.
    """

    channel_dim: ClassVar[int] = -1  # of the output, (..., features): the features (structfx.passes.axes)

    def __init__(self, in_features: int, out_features: int, rank: int = 1, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or rank < 1:
            raise StructfxError(
                f"BTTLinear needs positive sizes and rank, got in={in_features}, out={out_features}, rank={rank}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        m1, m0, self.padded_in = btt_factors(in_features)
        n0, n1, self.padded_out = btt_factors(out_features)
        self.blocks = (m0, m1, n0, n1)
        self.w1 = nn.Parameter(_normal((m1, m0, rank * n0), m0, rank * n0, generator))
        self.w2 = nn.Parameter(_normal((n0, rank * m1, n1), rank * m1, n1, generator))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise StructfxError(f"BTTLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        return torch.ops.structfx.btt(x, self.w1, self.w2, self.bias, self.out_features)

    def to_dense(self) -> Tensor:
        """The (out_features, in_features) matrix, summed block by block from the two cores."""
        m0, m1, n0, n1 = self.blocks
        r = self.rank
        left = self.w1.view(m1, m0, n0, r)  # [i1, i0, j0, s]
        right = self.w2.view(n0, m1, r, n1)  # [j0, i1, s, j1]
        dense = torch.einsum("acbs,basd->bdac", left, right)  # [j0, j1, i1, i0]
        return dense.reshape(self.padded_out, self.padded_in)[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, rank: int = 1) -> BTTLinear:
        """The Frobenius-optimal BTT of ``weight``: a rank-r truncated SVD of each m0 x n1 block.

        A rank above min(m0, n1), the blocks' full rank, is lowered to it: the rest would only add zeros.
        The SVD runs in float32 (float64 for a float64 weight); the layer has the weight's dtype and device.
        """
        out_features, in_features = weight.shape
        m0 = btt_factors(in_features)[1]
        n1 = btt_factors(out_features)[1]
        rank = min(rank, m0, n1)
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        layer = cls(in_features, out_features, rank, bias is not None).to(device=weight.device, dtype=work)
        m0, m1, n0, n1 = layer.blocks
        padded = F.pad(weight.detach().to(work), (0, layer.padded_in - in_features, 0, layer.padded_out - out_features))
        blocks = padded.reshape(n0, n1, m1, m0).permute(2, 0, 3, 1)  # [i1, j0, i0, j1]
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        keep = min(rank, s.shape[-1])
        root = s[..., :keep].sqrt()
        left = padded.new_zeros(m1, n0, m0, rank)
        right = padded.new_zeros(m1, n0, rank, n1)
        left[..., :keep] = u[..., :keep] * root[..., None, :]
        right[..., :keep, :] = vh[..., :keep, :] * root[..., :, None]
        with torch.no_grad():
            layer.w1.copy_(left.permute(0, 2, 1, 3).reshape(m1, m0, n0 * rank))
            layer.w2.copy_(right.permute(1, 0, 2, 3).reshape(n0, m1 * rank, n1))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer.to(weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"blocks(m0, m1, n0, n1)={self.blocks}, bias={self.bias is not None}"
        )


def _normal(shape, fan_in: int, fan_out: int, generator) -> Tensor:
    """Normal with std fan_in^-1/2 * min(1, sqrt(fan_out / fan_in)), the fans per block (W1: m0 -> r n0,
    W2: r m1 -> n1), as Qiu et al. (2024) initialise BTT cores."""
    std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))
    return torch.randn(shape, generator=generator) * std
