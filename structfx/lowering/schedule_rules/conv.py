"""CPU convolution schedule rule: direct convolution (conv1d/conv2d, NC(H)W, grouped and depthwise included).

A register tile of MR output channels by NR positions along the output's innermost axis accumulates in
registers over every (input channel, kernel offset): per step MR broadcast weights and one vector load of
the (padded) input row, the outer product of the two (the outer-product micro-kernel of the matmul schedule rule,
with the input row in place of B; Goto & van de Geijn 2008). Tiles over batch, channel blocks and output
rows run in parallel; the fused elementwise epilogue (bias, folded batch norm, activation, residual add)
is applied to each tile while it is in registers; blocks after it that are not elementwise on the output
(the next layer's zero padding) run as their own passes. The zero padding stays its own parallel, vectorised pass.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, Target, tirx
from structfx.lowering.ops.common import OpScheduleRule, present, vector_lanes
from structfx.lowering.schedule_rules.analysis import (
    conv_form,
    inline_elementwise_epilogue,
    root_blocks,
    single_main_block,
)
from structfx.lowering.schedule_rules.matmul import registers
from structfx.lowering.schedule_rules.spatial import parallel_tiles, parallel_vectorized

#: Widest tile along the output axis, in vectors.
MAX_VECTORS = 2


class Conv(OpScheduleRule):
    """One convolution block per function, spatial blocks (padding) before it, elementwise after it."""

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        found = single_main_block(sch, conv_form)
        if found is None:
            return False
        main, form, _ = found
        extents = [iv.dom.extent for iv in sch.get(main).iter_vars]
        channels, width = extents[form.f], extents[form.x]
        if not isinstance(channels, tirx.IntImm) or not isinstance(width, tirx.IntImm):
            return False
        found = inline_elementwise_epilogue(sch, main)
        if found is None:
            return False
        if found[0] is None:  # the tile's copy out: the accumulators stay local
            sch.cache_write(main, 0, "global")
            found = inline_elementwise_epilogue(sch, main)
        out = found[0]
        others = [b for b in root_blocks(sch) if sch.get(b).name_hint not in
                  (sch.get(main).name_hint, sch.get(out).name_hint)]
        lanes = vector_lanes(target)
        nr = _width_tile(width.value, lanes)
        vectors = -(-nr // lanes)
        mr = max(d for d in range(1, min(8, (registers(lanes) - 4) // vectors) + 1) if channels.value % d == 0)
        loops = list(sch.get_loops(main))[-len(extents):]
        f_outer, f_inner = _tile(sch, loops[form.f], channels.value, mr)
        x_outer, x_inner = _tile(sch, loops[form.x], width.value, nr)
        outer = []
        for axis in form.order:
            if axis == form.f:
                outer += present(f_outer)
            elif axis == form.x:
                outer += present(x_outer)
            else:
                outer.append(loops[axis])
        reduce = [loops[p] for p in form.reduce]
        sch.reorder(*outer, *reduce, *present(f_inner, x_inner))
        tile = parallel_tiles(sch, outer)
        if f_inner is not None:
            sch.unroll(f_inner)
        if x_inner is not None:
            sch.vectorize(x_inner)
        sch.reverse_compute_at(out, tile)
        sch.decompose_reduction(main, reduce[0])  # accumulators stay global: a stack array (see rules/matmul.py)
        out_loops = sch.get_loops(out)
        if isinstance(sch.get(out_loops[-1]).extent, tirx.IntImm):
            sch.vectorize(out_loops[-1])
        for block in others:
            parallel_vectorized(sch, block, lanes)
        return True


def _tile(sch: Schedule, loop, extent: int, factor: int):
    """(outer, inner) of a split by ``factor`` (a divisor of ``extent``); None for a side of extent 1."""
    if factor >= extent:
        return None, loop
    if factor <= 1:
        return loop, None
    return sch.split(loop, [None, factor])


def _width_tile(width: int, lanes: int) -> int:
    """Positions per tile along the output axis: all of it up to MAX_VECTORS vectors, else its largest
    divisor that fills at least half a vector (1 where there is none: a scalar tile)."""
    if width <= MAX_VECTORS * lanes:
        return width
    fitting = [d for d in range(MAX_VECTORS * lanes, lanes // 2 - 1, -1) if width % d == 0]
    return fitting[0] if fitting else 1
