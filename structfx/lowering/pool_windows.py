"""Pooling windows clipped to the input they can reach, before TVM imports the program.

A pool with one output along a spatial dimension whose window reaches past the padded input (a global
pool written as a fixed-size pool: transformers' EfficientNet pools its 2x2 last map with
``AvgPool2d(hidden_dim, ceil_mode=True)``, a 640x640 window) averages or maxes exactly what the
window clipped to ``input + 2 * padding`` covers. TVM's ``pool2d`` pads the input to the full window
and visits every element of it, k*k work per output (640 ms for that one pool where torch, which
clips its loops, takes microseconds). Each such dimension's kernel and stride become ``input + 2 *
padding``, so it still has one output; where every dimension has one output ``ceil_mode`` changes
nothing and is dropped. The divisor is unchanged: torch clips the window at ``input + padding``
before counting it (``count_include_pad``) and counts only input elements otherwise.

Dimensions of several outputs, symbolic sizes and dilated max pools are left as they are.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

#: Pooling ops (all take input, kernel_size, stride, padding and ceil_mode) and their spatial rank.
POOLS = {
    aten.avg_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool3d.default: 3,
    aten.max_pool1d.default: 1,
    aten.max_pool2d.default: 2,
    aten.max_pool3d.default: 3,
    aten.max_pool2d_with_indices.default: 2,
    aten.max_pool3d_with_indices.default: 3,
}


def clip_pool_windows(gm: torch.fx.GraphModule) -> int:
    """Clip, in place, the windows of every pool with one output along a dimension to the padded input
    along it (see the module docstring); returns how many pools changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in POOLS:
            continue
        clipped = _clipped(node, POOLS[node.target])
        if clipped is not None:
            node.args, node.kwargs = tuple(clipped.values()), {}
            changed += 1
    if changed:
        gm.recompile()
    return changed


def _clipped(node: torch.fx.Node, rank: int) -> dict | None:
    """The node's arguments by schema name with its windows clipped, or None when no dimension needs it."""
    arguments = pool_arguments(node)
    source, output = node.args[0].meta.get("val"), node.meta.get("val")
    output = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(source, torch.Tensor) or not isinstance(output, torch.Tensor):
        return None
    sizes, outputs = tuple(source.shape[-rank:]), tuple(output.shape[-rank:])
    dilated = per_dim(arguments.get("dilation", 1), rank) != [1] * rank
    if dilated or not all(isinstance(d, int) for d in sizes + outputs):
        return None
    kernel = per_dim(arguments["kernel_size"], rank)
    stride = per_dim(arguments["stride"], rank) if arguments["stride"] else list(kernel)
    reach = [size + 2 * pad for size, pad in zip(sizes, per_dim(arguments["padding"], rank))]
    clip = [out == 1 and k > r for out, k, r in zip(outputs, kernel, reach)]
    if not any(clip):
        return None
    arguments["kernel_size"] = [r if c else k for c, k, r in zip(clip, kernel, reach)]
    arguments["stride"] = [r if c else s for c, s, r in zip(clip, stride, reach)]
    if all(out == 1 for out in outputs):
        arguments["ceil_mode"] = False
    return arguments


def pool_arguments(node: torch.fx.Node) -> dict:
    """A pool node's arguments by schema name, in schema order, defaults filled in."""
    schema = node.target._schema.arguments
    given = dict(zip([a.name for a in schema], node.args)) | dict(node.kwargs)
    return {a.name: given.get(a.name, a.default_value if a.has_default_value() else None) for a in schema}


def per_dim(value, rank: int) -> list[int]:
    """A pool argument (an int, or a list of one or `rank` ints) as `rank` ints."""
    if isinstance(value, int):
        return [value] * rank
    value = list(value)
    return value * rank if len(value) == 1 else value
