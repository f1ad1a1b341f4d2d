"""Max-plus pooling: a per-channel dilation with a learned structuring element.

``y[b, c, i, j] = max_{(p, q)} x[b, c, i*s + p*d - pad, j*s + q*d - pad] + se[c, p, q]``; padded
positions are -inf and never win. ``se = 0`` is exactly ``nn.MaxPool2d`` with the same geometry. Not in
the max-plus papers (they keep max pooling): morphological dilation, per channel, with a learned element.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from structfx.errors import StructfxError
from structfx.nn.owned import owned


def pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of one spatial dimension, by the same rule as ``nn.MaxPool2d``."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def _padded_input(x: Tensor, se: Tensor, stride, padding, dilation, ceil_mode) -> tuple[Tensor, int, int]:
    """x padded with -inf so that every window, ceil_mode ones included, lies inside it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = se.shape[1:], stride, padding, dilation
    height, width = x.shape[-2:]
    oh = pooled_size(height, kh, sh, ph, dh, ceil_mode)
    ow = pooled_size(width, kw, sw, pw, dw, ceil_mode)
    extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (height + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (width + 2 * pw))
    padded = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
    return padded, oh, ow


def _window_max(x: Tensor, se: Tensor, stride, padding, dilation, ceil_mode):
    """Windows as columns (N, C, kh*kw, L) plus se, reduced by max; returns (values, winner, geometry)."""
    n, c = x.shape[:2]
    padded, oh, ow = _padded_input(x, se, stride, padding, dilation, ceil_mode)
    cols = F.unfold(padded, tuple(se.shape[1:]), dilation=tuple(dilation), stride=tuple(stride))
    cols = cols.view(n, c, se[0].numel(), oh * ow) + se.reshape(1, c, -1, 1)
    y, winner = cols.max(dim=2)  # first maximum wins ties
    return y.view(n, c, oh, ow), winner, padded.shape[-2:]


@torch.library.custom_op("structfx::maxplus_pool2d", mutates_args=())
def maxplus_pool2d(
    x: Tensor, se: Tensor, stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool
) -> Tensor:
    """Max-plus pooling of x (N, C, H, W) with structuring element se (C, kh, kw)."""
    y, _, _ = _window_max(x, se, stride, padding, dilation, ceil_mode)
    return owned(y)


@maxplus_pool2d.register_fake
def _(x, se, stride, padding, dilation, ceil_mode):
    kh, kw = se.shape[1:]
    oh = pooled_size(x.shape[2], kh, stride[0], padding[0], dilation[0], ceil_mode)
    ow = pooled_size(x.shape[3], kw, stride[1], padding[1], dilation[1], ceil_mode)
    return x.new_empty((x.shape[0], x.shape[1], oh, ow))


def _setup_context(ctx, inputs, output) -> None:
    x, se, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, se)


def _backward(ctx, grad: Tensor):
    """The gradient goes to the winning input and the winning se entry of each window."""
    x, se = ctx.saved_tensors
    stride, padding, dilation, ceil_mode = ctx.geometry
    n, c, height, width = x.shape
    _, winner, padded_size = _window_max(x, se, stride, padding, dilation, ceil_mode)
    cols = grad.new_zeros(n, c, se[0].numel(), winner.shape[-1])
    cols.scatter_(2, winner.unsqueeze(2), grad.reshape(n, c, 1, -1))
    grad_se = cols.sum((0, 3)).view_as(se)
    grad_padded = F.fold(
        cols.view(n, c * se[0].numel(), winner.shape[-1]), tuple(padded_size), tuple(se.shape[1:]),
        dilation=tuple(dilation), stride=tuple(stride),
    )
    grad_x = grad_padded[:, :, padding[0]:padding[0] + height, padding[1]:padding[1] + width]
    return grad_x, grad_se, None, None, None, None


maxplus_pool2d.register_autograd(_backward, setup_context=_setup_context)


def maxplus_pool2d_reference(x: Tensor, se: Tensor, stride, padding, dilation, ceil_mode) -> Tensor:
    """Brute force: the max over kernel offsets of strided slices of the -inf-padded input."""
    (kh, kw), (sh, sw), (dh, dw) = se.shape[1:], stride, dilation
    padded, oh, ow = _padded_input(x, se, stride, padding, dilation, ceil_mode)
    y = torch.full((*x.shape[:2], oh, ow), float("-inf"), dtype=x.dtype)
    for p in range(kh):
        for q in range(kw):
            window = padded[:, :, p * dh:p * dh + (oh - 1) * sh + 1:sh, q * dw:q * dw + (ow - 1) * sw + 1:sw]
            y = torch.maximum(y, window + se[:, p, q].view(1, -1, 1, 1))
    return y


class MaxPlusPool2d(nn.Module):
    """Max-plus pooling over (N, C, H, W) or (C, H, W) with a learned (C, kh, kw) structuring element.

    Same geometry arguments as ``nn.MaxPool2d``; ``se`` starts at 0, which is exactly max pooling.
    """

    channel_dim: ClassVar[int] = 1  # of the output, (N, C, ...): the channels (structfx.passes.axes)

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil_mode = ceil_mode
        _check_geometry(channels, self.kernel_size, self.stride, self.padding, self.dilation)
        self.se = nn.Parameter(torch.zeros(channels, *self.kernel_size))

    @classmethod
    def from_module(
        cls, pool: nn.Module, channels: int, input_size: tuple[int, int] | None = None
    ) -> MaxPlusPool2d:
        """Same geometry as ``pool`` (max, avg or adaptive with an evenly dividing output), se = 0."""
        if isinstance(pool, nn.MaxPool2d):
            if pool.return_indices:
                raise StructfxError("MaxPool2d(return_indices=True) has no max-plus equivalent")
            return cls(channels, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        if isinstance(pool, nn.AvgPool2d):
            return cls(channels, pool.kernel_size, pool.stride, pool.padding, 1, pool.ceil_mode)
        if isinstance(pool, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
            kernel = adaptive_kernel(pool.output_size, input_size)
            return cls(channels, kernel, kernel)
        raise StructfxError(f"MaxPlusPool2d.from_module converts 2-D max/avg/adaptive pools, got {type(pool).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.channels:
            raise StructfxError(
                f"MaxPlusPool2d expects (N, {self.channels}, H, W) or ({self.channels}, H, W), got {tuple(x.shape)}"
            )
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        y = torch.ops.structfx.maxplus_pool2d(
            batched, self.se, list(self.stride), list(self.padding), list(self.dilation), self.ceil_mode
        )
        return y if x.dim() == 4 else y.squeeze(0)

    def reference(self, x: Tensor) -> Tensor:
        """The brute-force window max (tests only)."""
        return maxplus_pool2d_reference(x, self.se, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


def adaptive_kernel(output_size, input_size: tuple[int, int] | None) -> tuple[int, int]:
    """The fixed window an adaptive pool uses on ``input_size``: needs output sizes that divide it."""
    if input_size is None:
        raise StructfxError("an adaptive pool needs its input size (H, W) to become a fixed max-plus window")
    out = tuple(o if o is not None else i for o, i in zip(_pair(output_size), input_size))
    if any(i % o for i, o in zip(input_size, out)):
        raise StructfxError(
            f"adaptive pool output {out} does not divide input {tuple(input_size)}: its windows overlap unevenly"
        )
    return tuple(i // o for i, o in zip(input_size, out))


def _check_geometry(channels, kernel, stride, padding, dilation) -> None:
    if channels < 1 or min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise StructfxError(
            f"MaxPlusPool2d needs positive channels/kernel/stride/dilation and padding >= 0, got "
            f"channels={channels}, kernel={kernel}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise StructfxError(f"padding {padding} must be at most half the kernel {kernel}, as for nn.MaxPool2d")
