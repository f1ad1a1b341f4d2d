"""Sparse max-plus layer: ``y[j] = max(b[j], max_t x[idx[j, t]] + w[j, t])``
("Sparse Hybrid Linear-Morphological Networks", arXiv 2504.09289, EUSIPCO 2025).

Each output keeps k finite weights at fixed, distinct input indices. The forward gathers one (B, n_out)
slice per t, so memory is O(B * n_out), never the paper's (B, n_out, n_in) broadcast. The features are
the last dim (SparseMaxPlus) or dim 1 of a feature map (ChannelMaxPlus): the op takes the axis, so a
channel layer reads its map in place instead of through transposed copies.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from structfx.errors import StructfxError
from structfx.nn.owned import owned

#: Weight of the inactive entries in the "relu" init: far below any activation, yet finite so that
#: sums and gradients stay finite (never -inf).
INACTIVE_WEIGHT = -1.0e4


def _winner_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k < 255 else torch.int32


def _channels(x: Tensor, dim: int) -> Tensor:
    """x as (outer, n_in, inner): the features at dim 1 (a view where x's layout allows)."""
    return x.reshape(math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:]))


def _forward_with_winner(x: Tensor, idx: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """Max-plus forward on x (outer, n_in, inner) over its dim 1; also returns which candidate won (0 = bias,
    t + 1 = entry t). A strict ``>`` keeps the first of tied candidates: the bias, then the lowest t."""
    n_out, k = idx.shape
    shape = (x.shape[0], n_out, x.shape[2])
    if b is None:
        y = x.index_select(1, idx[:, 0]) + w[:, 0, None]
        winner = torch.ones(shape, dtype=_winner_dtype(k), device=x.device)
        first = 1
    else:
        y = b[:, None].expand(shape).clone()
        winner = torch.zeros(shape, dtype=_winner_dtype(k), device=x.device)
        first = 0
    for t in range(first, k):
        candidate = x.index_select(1, idx[:, t]) + w[:, t, None]
        winner.masked_fill_(candidate > y, t + 1)
        torch.maximum(y, candidate, out=y)
    return y, winner


@torch.library.custom_op("structfx::sparse_maxplus", mutates_args=())
def sparse_maxplus(x: Tensor, idx: Tensor, w: Tensor, b: Tensor | None, dim: int = -1) -> Tensor:
    """``y[..., j, ...] = max(b[j], max_t x[..., idx[j, t], ...] + w[j, t])`` over x's features at ``dim``:
    x (..., n_in, ...) -> (..., n_out, ...), idx/w (n_out, k), b (n_out,) or None. ``dim=-1`` is a dense
    layer's place; ``dim=1`` a feature map's channels (N, C, *spatial), read where they lie: one gather of
    whole (spatial) rows per t, no transposed copy of x."""
    dim = dim % x.dim()
    y, _ = _forward_with_winner(_channels(x, dim), idx, w, b)
    return owned(y.reshape(*x.shape[:dim], idx.shape[0], *x.shape[dim + 1:]))


@sparse_maxplus.register_fake
def _(x: Tensor, idx: Tensor, w: Tensor, b: Tensor | None, dim: int = -1) -> Tensor:
    dim = dim % x.dim()
    return x.new_empty((*x.shape[:dim], idx.shape[0], *x.shape[dim + 1:]))


def _setup_context(ctx, inputs, output) -> None:
    x, idx, w, b, dim = inputs
    ctx.has_bias = b is not None
    ctx.dim = dim % x.dim()
    ctx.save_for_backward(x, idx, w, b)


def _backward(ctx, grad: Tensor):
    """Subgradient: each output's gradient goes to its single winner (recomputed, O(B * n_out))."""
    x, idx, w, b = ctx.saved_tensors
    features = _channels(x, ctx.dim)
    g = _channels(grad, ctx.dim)
    _, winner = _forward_with_winner(features, idx, w, b)
    grad_x = torch.zeros_like(features)
    grad_w = torch.empty_like(w)
    for t in range(idx.shape[1]):
        g_t = torch.where(winner == t + 1, g, 0)
        grad_x.index_add_(1, idx[:, t], g_t)
        grad_w[:, t] = g_t.sum((0, 2))
    grad_b = torch.where(winner == 0, g, 0).sum((0, 2)) if ctx.has_bias else None
    return grad_x.reshape(x.shape), None, grad_w, grad_b, None


sparse_maxplus.register_autograd(_backward, setup_context=_setup_context)


def sparse_maxplus_reference(x: Tensor, idx: Tensor, w: Tensor, b: Tensor | None, in_features: int) -> Tensor:
    """Brute force, as the paper computes it: a dense (n_out, n_in) weight that is -inf off the support,
    broadcast against x. O(B * n_out * n_in) memory: for tests and the memory benchmark only."""
    dense = torch.full((idx.shape[0], in_features), float("-inf"), dtype=w.dtype, device=w.device)
    dense = dense.scatter(1, idx, w)
    y = (x[..., None, :] + dense).amax(-1)
    return y if b is None else torch.maximum(y, b)


def distinct_indices(rows: int, population: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct indices in ``[0, population)`` per row, uniform over subsets (Floyd's algorithm,
    vectorised over rows: O(rows * k) memory instead of a (rows, population) shuffle)."""
    chosen = torch.empty(rows, k, dtype=torch.long)
    for col, top in enumerate(range(population - k, population)):
        draw = torch.randint(0, top + 1, (rows,), generator=generator)
        taken = (chosen[:, :col] == draw[:, None]).any(1)
        chosen[:, col] = torch.where(taken, torch.full_like(draw, top), draw)
    return chosen


class SparseMaxPlus(nn.Module):
    """Sparse max-plus (morphological) layer, ``(..., in_features) -> (..., out_features)``.

    ``y[j] = max(b[j], max_{t<k} x[idx[j, t]] + w[j, t])`` with ``idx`` a fixed buffer of k distinct
    input indices per output. ``init="paper"``: w, b ~ N(0, 1) at random indices; ``init="relu"``
    (needs in == out and a bias): exactly ``ReLU`` at construction.
    """

    channel_dim: ClassVar[int] = -1  # of the output, (..., features): the features (structfx.passes.axes)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int = 2,
        bias: bool = True,
        init: Literal["paper", "relu"] = "paper",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(in_features, out_features, k)
        self.in_features, self.out_features, self.k = in_features, out_features, k
        if init == "paper":
            idx = distinct_indices(out_features, in_features, k, generator)
            w = torch.randn(out_features, k, generator=generator)
            b = torch.randn(out_features, generator=generator)
        elif init == "relu":
            idx, w, b = _relu_init(in_features, out_features, k, bias, generator)
        else:
            raise StructfxError(f"SparseMaxPlus init={init!r} is unknown; use 'paper' or 'relu'")
        self.register_buffer("idx", idx)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b) if bias else None

    @classmethod
    def from_module(
        cls, relu: nn.Module, features: int, k: int = 2, generator: torch.Generator | None = None
    ) -> SparseMaxPlus:
        """The function-preserving replacement of ``relu`` on ``features`` channels ("relu" init)."""
        if not isinstance(relu, nn.ReLU):
            raise StructfxError(f"SparseMaxPlus.from_module converts nn.ReLU, got {type(relu).__name__}")
        return cls(features, features, k, bias=True, init="relu", generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise StructfxError(
                f"SparseMaxPlus expects inputs (..., {self.in_features}), got {tuple(x.shape)}"
            )
        return in_layout_of(x, torch.ops.structfx.sparse_maxplus(x, self.idx, self.weight, self.bias))

    def reference(self, x: Tensor) -> Tensor:
        """The brute-force max over a dense -inf-filled weight (tests only)."""
        return sparse_maxplus_reference(x, self.idx, self.weight, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"bias={self.bias is not None}"
        )


def in_layout_of(x: Tensor, y: Tensor) -> Tensor:
    """``y`` laid out in memory as ``x`` is (as ``torch.relu(x)`` would be), when they have one shape: what
    reads it next (a conv, a matmul) then takes the same path, and ``init="relu"`` stays exact bit for bit."""
    if y.shape != x.shape or y.stride() == x.stride():
        return y
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))  # x's dims, outermost in memory first
    return y.permute(order).contiguous().permute([order.index(d) for d in range(x.dim())])


def _check_sizes(in_features: int, out_features: int, k: int) -> None:
    if in_features < 1 or out_features < 1:
        raise StructfxError(f"SparseMaxPlus needs positive sizes, got in={in_features}, out={out_features}")
    if not 1 <= k <= in_features:
        raise StructfxError(
            f"SparseMaxPlus k={k} must be between 1 and in_features={in_features}: "
            f"each output keeps k distinct inputs"
        )


def _relu_init(n_in: int, n_out: int, k: int, bias: bool, generator: torch.Generator | None):
    """Row j: entry 0 is x[j] + 0, the other k-1 are random distinct inputs at INACTIVE_WEIGHT, b = 0."""
    if n_in != n_out or not bias:
        raise StructfxError(
            f"init='relu' reproduces ReLU, which needs in_features == out_features and bias=True "
            f"(got in={n_in}, out={n_out}, bias={bias}); use init='paper' otherwise"
        )
    own = torch.arange(n_out)
    others = distinct_indices(n_out, n_in - 1, k - 1, generator)
    others = others + (others >= own[:, None]).long()  # skip index j itself
    idx = torch.cat([own[:, None], others], dim=1)
    w = torch.full((n_out, k), INACTIVE_WEIGHT)
    w[:, 0] = 0.0
    return idx, w, torch.zeros(n_out)


class ChannelMaxPlus(SparseMaxPlus):
    """SparseMaxPlus across the channels of a feature map (N, C, *spatial), at every position alike.

    What replaces a ReLU on a conv feature map: with init="relu" it is exactly that ReLU, down to the
    output's memory format (contiguous in, contiguous out; channels-last in, channels-last out). It calls
    ``sparse_maxplus`` with ``dim=1``: compiled, that is one kernel vectorised along the spatial axis
    (``structfx.lowering.ops.channel_maxplus``), not a transpose, the kernel and a transpose back.
    """

    channel_dim: ClassVar[int] = 1  # of the output, (N, C, ...): the channels (structfx.passes.axes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[1] != self.in_features:
            raise StructfxError(
                f"ChannelMaxPlus expects (N, {self.in_features}, *spatial) inputs, got {tuple(x.shape)}"
            )
        return in_layout_of(x, torch.ops.structfx.sparse_maxplus(x, self.idx, self.weight, self.bias, 1))

    def reference(self, x: Tensor) -> Tensor:
        return super().reference(x.movedim(1, -1)).movedim(-1, 1)
