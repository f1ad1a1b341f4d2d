"""Finding the layers a rule may replace, in every spelling, as one normalised ``Site``.

Module forms (``nn.Linear``, ``nn.ReLU``, pools, transformers' ``Conv1D``) and functional or method forms
(``F.linear`` with a parameter weight, ``F.relu``/``torch.relu``/``x.relu()`` and their in-place forms,
``F.max_pool2d``/``F.avg_pool2d``/adaptive pools) all become a Site holding an equivalent module, so that
the rules convert one thing and the report measures one thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.operator_schemas import normalize_function

from structfx.errors import module_place

SiteKind = Literal["dense", "relu", "pool"]
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}
RELU_METHODS = {"relu": False, "relu_": True}
POOL_FUNCTIONS = {
    F.max_pool2d: lambda kw: nn.MaxPool2d(
        kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"], kw["return_indices"], kw["ceil_mode"]
    ),
    F.avg_pool2d: lambda kw: nn.AvgPool2d(  # its schema spells "stride left out" as [] (None elsewhere)
        kw["kernel_size"], kw["stride"] or None, kw["padding"], kw["ceil_mode"], kw["count_include_pad"],
        kw["divisor_override"],
    ),
    F.adaptive_max_pool2d: lambda kw: nn.AdaptiveMaxPool2d(kw["output_size"], kw["return_indices"]),
    F.adaptive_avg_pool2d: lambda kw: nn.AdaptiveAvgPool2d(kw["output_size"]),
}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: ``y = x @ W + b`` with W of shape (in, out). Matched by shape, so
    that structfx does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def module_kind(module: nn.Module) -> SiteKind | None:
    """The kind of a plain layer: one whose class computes exactly what the torch layer does (a subclass
    that overrides ``forward`` is not one, whatever it inherits)."""
    if is_conv1d(module):
        return "dense"
    for base, kind in ((nn.Linear, "dense"), (nn.ReLU, "relu"), *((pool, "pool") for pool in POOLS)):
        if isinstance(module, base):
            return kind if type(module).forward is base.forward else None
    return None


def dense_parameters(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight (out, in), bias) of a dense site's module."""
    if is_conv1d(module):
        return module.weight.T, module.bias
    return module.weight, module.bias


@dataclass
class Site:
    """One candidate layer: where it is, what it is, and what flowed into it."""

    name: str
    kind: SiteKind
    module: nn.Module  # the layer as a module; functional forms rebuilt as their module equivalent
    node: fx.Node | None = None  # None for a module swapped outside any traced graph
    input_node: fx.Node | None = None
    inplace: bool = False
    input_shape: tuple[int, ...] | None = None
    channel_axis: int | None = None  # for ReLUs: the dim a max-plus mixes (from the producer, see axes.py)
    samples: list[Tensor] = field(default_factory=list)  # recorded inputs: calibration, else example

    @property
    def place(self) -> str:
        """How messages name the site: a module by its path and class (``module 'features.0' (Linear)``), a
        functional call by its graph node under the module that makes it (``call 'block.relu_1' (relu_)``)."""
        if self.node is None or self.node.op == "call_module":
            return module_place(self.name, type(self.module).__name__)
        return f"call '{self.name}' ({getattr(self.node.target, '__name__', self.node.target)})"

    @property
    def features(self) -> int | None:
        """What min_features compares against: min(in, out) for dense, channels for ReLU and pools."""
        if self.kind == "dense":
            weight, _ = dense_parameters(self.module)
            return min(weight.shape)
        if self.input_shape is None or len(self.input_shape) < 1:
            return None
        if self.kind == "pool":
            return self.input_shape[-3] if len(self.input_shape) >= 3 else None
        axis = self.channel_axis if self.channel_axis is not None else default_channel_axis(self.input_shape)
        return self.input_shape[axis]


def default_channel_axis(shape: tuple[int, ...]) -> int:
    """Where nothing says better (axes.py): channels at dim 1 of a 4-D feature map, else last."""
    return 1 if len(shape) == 4 else len(shape) - 1


def site_from_module(name: str, module: nn.Module) -> Site | None:
    kind = module_kind(module)
    if kind is None:
        return None
    return Site(name, kind, module, inplace=kind == "relu" and module.inplace)


def site_from_node(gm: fx.GraphModule, node: fx.Node, prefix: str) -> Site | None:
    """The Site a graph node is, or None when it is not a candidate."""
    if node.op == "call_module":
        site = site_from_module(prefix + str(node.target), gm.get_submodule(node.target))
    elif node.op == "call_method" and node.target in RELU_METHODS:
        site = Site(prefix + node.name, "relu", nn.ReLU(), inplace=RELU_METHODS[node.target])
    elif node.op == "call_function":
        site = _site_from_function(gm, node, prefix)
    else:
        site = None
    if site is not None:
        site.node, site.input_node = node, first_input(node)
    return site


def first_input(node: fx.Node) -> fx.Node | None:
    value = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return value if isinstance(value, fx.Node) else None


def _site_from_function(gm: fx.GraphModule, node: fx.Node, prefix: str) -> Site | None:
    name = prefix + node.name
    if node.target in RELU_FUNCTIONS:
        inplace = RELU_FUNCTIONS[node.target] or bool(node.kwargs.get("inplace", False))
        return Site(name, "relu", nn.ReLU(), inplace=inplace)
    if node.target is F.linear:
        linear = _linear_from_attributes(gm, node)
        return None if linear is None else Site(name, "dense", linear)
    if node.target in POOL_FUNCTIONS:
        kwargs = _literal_kwargs(node)
        return None if kwargs is None else Site(name, "pool", POOL_FUNCTIONS[node.target](kwargs))
    return None


def _literal_kwargs(node: fx.Node) -> dict | None:
    """The call's arguments by name, or None when any argument besides the input is computed in the graph."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None
    kwargs = dict(normalized.kwargs)
    kwargs.pop("input")
    return None if any(isinstance(v, fx.Node) for v in kwargs.values()) else kwargs


def _linear_from_attributes(gm: fx.GraphModule, node: fx.Node) -> nn.Linear | None:
    """``F.linear(x, W, b)`` with W (and b) parameters of the model, as an nn.Linear sharing them."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    weight_node, bias_node = normalized.kwargs["weight"], normalized.kwargs.get("bias")
    weight, bias = _parameter(gm, weight_node), _parameter(gm, bias_node)
    if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
        return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


def _parameter(gm: fx.GraphModule, node: object) -> nn.Parameter | None:
    """The parameter a get_attr node reads, or None for anything else (a buffer, a computed tensor)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:
        return None
