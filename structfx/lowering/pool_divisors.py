"""Average pools with ``divisor_override``, before TVM imports the program.

TVM's importer drops ``avg_pool2d``'s and ``avg_pool3d``'s ``divisor_override`` (the sum over a window
divided by a given number instead of the window's size) and returns the plain average: wrong values.
Where no window reaches past the padded input (no ``ceil_mode`` overhang), every window of the average
that counts padding (``count_include_pad=True``) divides by the kernel's volume, so the pool becomes that
average times ``volume / divisor_override``. A pool whose last windows overhang (their torch divisor is
clipped, so no one factor fits) or whose sizes are symbolic raises StructfxError instead of giving wrong
values.
"""

from __future__ import annotations

import math

import torch

from structfx.errors import StructfxError
from structfx.lowering.pool_windows import per_dim, pool_arguments

aten = torch.ops.aten

#: Average pools taking (input, kernel_size, stride, padding, ceil_mode, count_include_pad,
#: divisor_override) and their spatial rank.
POOLS = {aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


def rescale_divisor_overrides(gm: torch.fx.GraphModule) -> int:
    """Rewrite, in place, every average pool with a ``divisor_override`` as the average counting padding
    times ``kernel volume / divisor_override`` (see the module docstring); returns how many changed.

    Raises StructfxError naming the node when a pool's windows overhang its padded input or its sizes
    are symbolic."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in POOLS:
            continue
        arguments = pool_arguments(node)
        divisor = arguments["divisor_override"]
        if divisor is None:
            continue
        volume = math.prod(_kernel_volume_if_never_clipped(node, arguments, POOLS[node.target]))
        arguments["count_include_pad"], arguments["divisor_override"] = True, None
        node.args, node.kwargs = tuple(arguments.values()), {}
        users = list(node.users)
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(aten.mul.Tensor, (node, volume / divisor))
        for user in users:
            user.replace_input_with(node, scaled)
        scaled.meta = dict(node.meta)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _kernel_volume_if_never_clipped(node: torch.fx.Node, arguments: dict, rank: int) -> list[int]:
    """The kernel's extent along each spatial dimension, after checking that no window of ``node``
    reaches past its padded input (so torch divides every window by the kernel's volume)."""
    source, output = node.args[0].meta.get("val"), node.meta.get("val")
    kernel = per_dim(arguments["kernel_size"], rank)
    stride = per_dim(arguments["stride"], rank) if arguments["stride"] else list(kernel)
    padding = per_dim(arguments["padding"], rank)
    sizes = tuple(source.shape[-rank:]) if isinstance(source, torch.Tensor) else ()
    outputs = tuple(output.shape[-rank:]) if isinstance(output, torch.Tensor) else ()
    place = f"node {node.name} ({node.target.__name__}, divisor_override={arguments['divisor_override']})"
    if not all(isinstance(d, int) for d in sizes + outputs) or len(sizes + outputs) != 2 * rank:
        raise StructfxError(
            f"[import] {place}: divisor_override needs static spatial sizes, and this pool's are symbolic; "
            "compile with static spatial sizes, or divide a sum pool (avg_pool2d without divisor_override, "
            "times the kernel's volume) yourself"
        )
    for out, k, s, size, pad in zip(outputs, kernel, stride, sizes, padding):
        if (out - 1) * s + k > size + 2 * pad:
            raise StructfxError(
                f"[import] {place}: with ceil_mode its last window reaches past the padded input, where torch "
                "divides by fewer than the kernel's elements and TVM cannot follow; pad the input so the "
                "windows fit (F.pad, then ceil_mode=False), or drop divisor_override"
            )
    return kernel

