"""Graph surgery: call a new module where a node was, keeping what an in-place node did to its input,
and drop the parameters nothing reads any more."""

from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from structfx.passes.sites import Site, first_input

#: Modules, functions and methods whose result is a new tensor, never a view of (or the same as) an input.
_FRESH_MODULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
    nn.GroupNorm, nn.Embedding, nn.MaxPool2d, nn.AvgPool2d,
)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg, torch.add,
    torch.sub, torch.mul, torch.div, torch.matmul, torch.bmm, torch.cat, torch.stack, F.linear, F.conv1d,
    F.conv2d, F.conv3d, F.relu, F.layer_norm, F.gelu, torch.tanh, torch.sigmoid, torch.relu, F.max_pool2d, F.avg_pool2d,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "bmm", "relu", "tanh", "sigmoid", "clone"}


def unique_attribute(gm: fx.GraphModule, name: str) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or "structfx"
    candidate, index = base, 1
    while hasattr(gm, candidate):
        index += 1
        candidate = f"{base}_{index}"
    return candidate


def replace_node(gm: fx.GraphModule, site: Site, attribute: str) -> None:
    """Call the module at ``attribute`` (out of place) on the site's input instead of the site's node.

    An in-place site also changed its input. Where nothing else can see that tensor (it is new, and no
    alias of it was taken before the site), later readers of the input are pointed at the new node;
    elsewhere the result is written back, ``x.copy_(new(x.clone()))``, so every alias sees it.
    """
    node, source = site.node, first_input(site.node)  # the input as it is now: earlier sites rewired it
    graph = gm.graph
    with graph.inserting_before(node):
        if site.inplace and not _private(gm, source, node):
            clone = graph.call_method("clone", (source,))
            new = graph.call_method("copy_", (source, graph.call_module(attribute, (clone,))))
        else:
            new = graph.call_module(attribute, (source,))
    node.replace_all_uses_with(new)
    if site.inplace and new.op == "call_module":
        order = {n: i for i, n in enumerate(graph.nodes)}
        for user in list(source.users):
            if user is not new and order[user] > order[node]:
                user.replace_input_with(source, new)
    graph.erase_node(node)


def _private(gm: fx.GraphModule, source: fx.Node, site: fx.Node) -> bool:
    """True when ``source`` is a new tensor and nothing before ``site`` took an alias of it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return _fresh(gm, source) and all(
        user is site or order[user] > order[site] or _fresh(gm, user) for user in source.users
    )


def _fresh(gm: fx.GraphModule, node: fx.Node) -> bool:
    from structfx.passes.standin import StandIn

    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, (*_FRESH_MODULES, StandIn)) or type(module).__name__ == "Conv1D"
    if node.kwargs.get("inplace") or node.kwargs.get("out") is not None:
        return False
    if node.target is F.relu and len(node.args) > 1 and node.args[1]:
        return False
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_method" and node.target in _FRESH_METHODS


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete submodules and parameters that no node uses any more (the replaced layers' weights; reads
    whose result nobody uses, such as a ``self.fc.weight.dtype`` check, do not count)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for name, _ in list(gm.named_parameters()):
        owner_path, _, attr = name.rpartition(".")
        owner_called = any(owner_path == c or owner_path.startswith(c + ".") for c in called)
        if name not in read and not owner_called:
            delattr(gm.get_submodule(owner_path) if owner_path else gm, attr)
