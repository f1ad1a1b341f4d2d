"""Graph surgery: put a new module where a node was, and drop the parameters nothing reads any more."""

from __future__ import annotations

import re

from torch import fx, nn

from structfx.passes.sites import Site


def unique_attribute(gm: fx.GraphModule, name: str) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or "structfx"
    candidate, index = base, 1
    while hasattr(gm, candidate):
        index += 1
        candidate = f"{base}_{index}"
    return candidate


def replace_node(gm: fx.GraphModule, site: Site, new_module: nn.Module) -> fx.Node:
    """Call ``new_module`` on the site's input instead of the site's node; returns the new node.

    An in-place ReLU also changed its input tensor: the input's later readers are pointed at the new node.
    """
    node, source = site.node, site.input_node
    attribute = unique_attribute(gm, site.name)
    gm.add_submodule(attribute, new_module)
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(attribute, (source,))
    node.replace_all_uses_with(new_node)
    if site.inplace:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for user in list(source.users):
            if user is not new_node and order[user] > order[node]:
                user.replace_input_with(source, new_node)
    gm.graph.erase_node(node)
    return new_node


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
