"""CPU schedule rule for convolutions on packed weights (``structfx.lowering.conv_packing.conv_packed``).

Direct convolution vectorised over output channels (Zhang, Franchetti & Low, "High performance
zero-memory overhead direct convolutions", ICML 2018): a register tile of MR output channels (whole
vectors) by rows x cols output positions keeps its accumulators in vector registers over every (input
channel, kernel offset); per step it loads MR contiguous packed weights and broadcasts one input element
per position, any stride or dilation (no gathers). Tiles over batch, channel blocks and output positions
run in parallel; the elementwise epilogue fusion put after the kernel (bias or folded batch norm,
activation, residual add) is applied to the tile before its one store; blocks fusion put after that
chain that are not elementwise on the output (the next layer's zero padding) run as their own passes.
The tile's accumulators stay in the global scope compacted to the tile, a stack array LLVM keeps in
registers (see ``dense_packed``). The zero padding of the input is its own parallel, vectorised pass.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, Target, tirx
from structfx.lowering.conv_packing import ACCUMULATE
from structfx.lowering.ops.common import OpScheduleRule, vector_lanes
from structfx.lowering.schedule_rules.analysis import (
    inline_elementwise_epilogue,
    root_blocks,
    single_main_block,
)
from structfx.lowering.schedule_rules.spatial import parallel_tiles, parallel_vectorized


class ConvPacked(OpScheduleRule):
    """The ``conv_packed`` kernel with its padding stage before it and whatever elementwise blocks
    fusion put after it; float32."""

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        found = single_main_block(sch, lambda block: block.name_hint == ACCUMULATE or None)
        if found is None:
            return False
        main = found[0]
        blocks = root_blocks(sch)
        position = [sch.get(b).name_hint for b in blocks].index(ACCUMULATE)
        block = sch.get(main)
        tile = block.annotations.get("structfx.conv_tile")
        if tile is None:
            return False
        rows, cols = (int(t) for t in tile)
        mr = _packed_width(block)
        kernel = blocks[position + 1]  # the padded accumulators' copy out, (N, F, *out)
        found = inline_elementwise_epilogue(sch, main, sch.get(kernel).writes[0].source.shape)
        if found is None or found[0] is None:
            return False
        out = found[0]
        nest = {ACCUMULATE, sch.get(out).name_hint}
        others = [b for b in root_blocks(sch) if sch.get(b).name_hint not in nest]  # padding, blocks after the chain
        spatial = sum(iv.iter_type == tirx.IterVar.DataPar for iv in block.iter_vars)
        loops = list(sch.get_loops(main))
        n, f, *positions = loops[:spatial]
        reduction = loops[spatial:]
        f_outer, f_inner = sch.split(f, [None, mr])
        outer, inner = [n, f_outer], []
        if len(positions) == 2:
            _tile(sch, positions[0], rows, outer, inner)
        _tile(sch, positions[-1], cols, outer, inner)
        sch.reorder(*outer, *reduction, *inner, f_inner)
        parallel = parallel_tiles(sch, outer)
        for loop in inner:
            sch.unroll(loop)
        sch.vectorize(f_inner)
        sch.reverse_compute_at(out, parallel)
        sch.decompose_reduction(main, reduction[0])
        for other in others:
            parallel_vectorized(sch, other, vector_lanes(target))
        return True


def _packed_width(block) -> int:
    """Output channels per packed block (the last dim of the packed weight the block reads)."""
    packed = max((region.source for region in block.reads), key=lambda buffer: len(buffer.shape))
    return int(packed.shape[-1])


def _tile(sch: Schedule, loop, size: int, outer: list, inner: list) -> None:
    """``loop`` split into tiles of ``size`` (outer part to ``outer``, the tile to ``inner``); kept whole in
    ``outer`` where ``size`` is 1."""
    if size > 1:
        loop_outer, loop_inner = sch.split(loop, [None, size])
        outer.append(loop_outer)
        inner.append(loop_inner)
    else:
        outer.append(loop)
