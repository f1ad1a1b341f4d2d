"""Which dim of a ReLU's input holds the channels: read off the layer that produced it, not its rank.

A Conv1d's (N, C, L) output has channels at dim 1, a Linear's (N, T, C) output at the last dim, and a
conv output permuted to (N, H, W, C) at the last dim again. Elementwise ops, norms and other ReLUs pass
the axis through; a permute or transpose moves it (in each spelling: ``x.t()``, ``x.T``, ``x.mT``,
``transpose``/``swapaxes``/``swapdims``, as methods or functions). Where no producer says,
``default_channel_axis`` holds.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from structfx import registry
from structfx.passes.sites import default_channel_axis, module_kind

_CHANNELS_FIRST_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_CHANNELS_LAST_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Bilinear)
_CHANNELS_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.max_pool2d, F.avg_pool2d}
_CHANNELS_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.embedding}
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul,
    torch.div, F.relu, torch.relu, torch.relu_, F.relu_, F.gelu, F.silu, F.dropout, torch.tanh, torch.sigmoid,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "relu", "relu_", "clone", "contiguous", "float", "to", "type_as", "tanh", "sigmoid",
}
#: Functions swapping two dims given as their 2nd and 3rd arguments.
_SWAPS = {torch.transpose, torch.swapaxes, torch.swapdims}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid)


def axis_of_module_output(module: nn.Module | None, ndim: int) -> int | None:
    """The channel dim of ``module``'s output of rank ``ndim``, or None when the module does not say.
    A registered op's layer says it itself, in its class attribute ``channel_dim`` (1 or -1), if it has one."""
    if module is None:
        return None
    own = getattr(module, "channel_dim", None) if isinstance(module, registry.layer_types()) else None
    if (own == 1 or isinstance(module, _CHANNELS_FIRST_MODULES)) and ndim >= 2:
        return 1
    if own == -1 or isinstance(module, _CHANNELS_LAST_MODULES) or module_kind(module) == "dense":
        return ndim - 1
    return None


def channel_axis(gm: fx.GraphModule, node: fx.Node, ndim: int, depth: int = 32) -> int | None:
    """The channel dim of ``node``'s value (rank ``ndim``) from the graph that computes it, or None."""
    if depth == 0 or not isinstance(node, fx.Node):
        return None
    first = next((a for a in node.args if isinstance(a, fx.Node)), None)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        found = axis_of_module_output(getattr(module, "original", module), ndim)
        if found is None and isinstance(module, _ELEMENTWISE_MODULES):
            return channel_axis(gm, first, ndim, depth - 1)
        return found
    if node.op == "call_function":
        if node.target in _CHANNELS_FIRST_FUNCTIONS:
            return 1
        if node.target in _CHANNELS_LAST_FUNCTIONS:
            return ndim - 1
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return _first_known(gm, node, ndim, depth)
        if node.target is torch.permute:
            return _permuted(gm, first, node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"), ndim, depth)
        if node.target in _SWAPS and len(node.args) == 3:
            return _transposed(gm, first, node.args[1], node.args[2], ndim, depth)
        if node.target is torch.t and ndim == 2:
            return _transposed(gm, first, 0, 1, ndim, depth)
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT") and ndim >= 2:
            if node.args[1] == "mT" or ndim == 2:
                return _transposed(gm, first, -2, -1, ndim, depth)
            return _permuted(gm, first, list(reversed(range(ndim))), ndim, depth)  # x.T reverses every dim
        return None
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return _first_known(gm, node, ndim, depth)
        if node.target == "permute" and len(node.args) > 1:
            dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
            return _permuted(gm, first, dims, ndim, depth)
        if node.target in ("transpose", "swapaxes", "swapdims") and len(node.args) == 3:
            return _transposed(gm, first, node.args[1], node.args[2], ndim, depth)
        if node.target == "t" and ndim == 2:
            return _transposed(gm, first, 0, 1, ndim, depth)
    return None


def _first_known(gm: fx.GraphModule, node: fx.Node, ndim: int, depth: int) -> int | None:
    for arg in node.args:
        if isinstance(arg, fx.Node) and _rank(arg) == ndim:
            found = channel_axis(gm, arg, ndim, depth - 1)
            if found is not None:
                return found
    return None


def _permuted(gm: fx.GraphModule, source: fx.Node, dims, ndim: int, depth: int) -> int | None:
    if not isinstance(dims, (list, tuple)) or len(dims) != ndim or not all(isinstance(d, int) for d in dims):
        return None
    before = channel_axis(gm, source, ndim, depth - 1)
    if before is None:
        return None
    return [d % ndim for d in dims].index(before)


def _transposed(gm: fx.GraphModule, source: fx.Node, a: object, b: object, ndim: int, depth: int) -> int | None:
    if not isinstance(a, int) or not isinstance(b, int):
        return None
    before = channel_axis(gm, source, ndim, depth - 1)
    if before is None:
        return None
    a, b = a % ndim, b % ndim
    return b if before == a else a if before == b else before


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def resolved_axis(found: int | None, shape: tuple[int, ...]) -> int:
    return default_channel_axis(shape) if found is None else found
