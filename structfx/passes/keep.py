"""When a site must be kept: the replacement would not be the same computation as the model's.

Each check returns the reason, for the report, or None. A layer whose parameter is tied to another (an
lm_head sharing the embedding's weight) would be untied; a layer whose parameters the graph also reads
directly would leave two copies; a ReLU or pool module called at several widths cannot be one replacement.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, fx, nn

from structfx.passes.sites import Site


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in ``model`` (several when tied)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def tie_problem(names: dict[int, list[str]], layer: nn.Module) -> str | None:
    for parameter in layer.parameters(recurse=False):
        tied = names.get(id(parameter), [])
        if len(tied) > 1:
            return f"its parameter is tied ({' = '.join(tied)}): kept, since replacing it would untie them"
    return None


def owner_problem(region: nn.Module, site: Site, calls: dict[nn.Module, list]) -> str | None:
    """F.linear on a weight that belongs to a torch layer called on its own (an embedding used as lm_head)."""
    node = site.node
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    owner_path = str(weight_node.target).rpartition(".")[0] if isinstance(weight_node, fx.Node) else ""
    owner = region.get_submodule(owner_path) if owner_path else region
    if owner is not region and owner in calls and type(owner).__module__.startswith("torch.nn"):
        return f"its weight belongs to {owner_path} ({type(owner).__name__}), which uses it too: kept tied"
    return None


def shape_problem(site: Site, inputs: list[Tensor]) -> str | None:
    """A ReLU or pool module called on inputs that one replacement cannot serve (another rank or width)."""
    if site.kind == "dense":
        return None
    axis = site.channel_axis if site.kind == "relu" else -3
    shapes = {(x.dim(), x.shape[axis] if x.dim() > max(axis, -axis - 1) else None) for x in inputs}
    if len(shapes) > 1:
        seen = sorted({tuple(x.shape) for x in inputs})
        return f"called on inputs of different ranks or widths {seen}: one replacement cannot serve them all"
    return None


def direct_reads(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """A module site whose parameters the graph also reads directly would be untied from them."""
    prefix = f"{node.target}."
    for other in gm.graph.nodes:
        if other.op == "get_attr" and str(other.target).startswith(prefix) and other.users:
            return f"its parameters are also read directly ({other.format_node()}): kept"
    return None


def weight_read_problem(site: Site) -> str | None:
    """F.linear's weight read for something else too (its transpose, another op) stays with the model."""
    for arg in (*site.node.args[1:3], *site.node.kwargs.values()):
        if isinstance(arg, fx.Node):
            others = [u for u in arg.users if u is not site.node and u.target is not F.linear]
            if others:
                return f"its weight is also read by {others[0].format_node()}: kept"
    return None
