"""CPU schedule rule for dense layers on packed weights (``structfx.lowering.packing.dense_packed``), any M.

The GEMM micro-kernel of Goto & van de Geijn ("Anatomy of high-performance matrix multiplication",
2008) on B packed into panels of P columns, (N / P, K, P), P two vectors: a register tile of ROWS rows
of A by one panel keeps ROWS x 2 accumulators in vector registers (4 x 2: 8 accumulators, two loads
of B and a broadcast of A fit AVX2's 16 registers); per step of k it broadcasts
one element of each A row and loads the panel's next P contiguous values of B. Panels run in
parallel, outermost; inside one, every row tile streams the same panel, which stays in L2 (K x P
floats: 256 KiB at K = 4096 on AVX2), while A's rows come from L3. The epilogue fused after the layer (bias,
activation, residual add, scale) is applied to the register tile after its last k, and the tile is
stored once. The tile's accumulators stay in the "global" scope the compaction shrinks to the tile: TVM's
LowerTVMBuiltin puts only small *global* allocations on the stack, where LLVM keeps them in registers; a
"local" one is allocated from the workspace and every FMA's result is stored to memory (2.9x slower
measured inside the compiled module). The kernel computes a whole number of row tiles (``dense_packed``
re-reads A's last row for the padded ones, never stored): a symbolic M needs no tail loop and no copy of A.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, Target, tirx
from structfx.lowering.ops.common import OpScheduleRule, find_block, vector_lanes
from structfx.lowering.packing import ACCUMULATE, ROWS
from structfx.lowering.schedule_rules.analysis import inline_epilogue, reduces, root_blocks
from structfx.lowering.schedule_rules.spatial import parallel_tiles, parallel_vectorized

#: Below this many panels, row tiles run in parallel with the panels (too few panels to share out).
MIN_PARALLEL_PANELS = 8


class DensePacked(OpScheduleRule):
    """The ``dense_packed`` kernel with whatever elementwise blocks fusion put after it; float32."""

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        main = find_block(sch, ACCUMULATE)
        if main is None:
            return False
        blocks = root_blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        position = names.index(ACCUMULATE)
        if any(reduces(sch.get(b)) for n, b in enumerate(blocks) if n != position):
            return False
        lanes = vector_lanes(target)
        out = inline_epilogue(sch, main)
        if out is None:
            return False
        nest = {ACCUMULATE, sch.get(out).name_hint}
        others = [b for b in root_blocks(sch) if sch.get(b).name_hint not in nest]
        panel = _panel_width(sch.get(main))
        i, j, k = sch.get_loops(main)
        panels = int(sch.get(j).extent) // panel
        i_outer, i_inner = sch.split(i, [None, ROWS])
        j_outer, j_inner = sch.split(j, [None, panel])
        if panels >= MIN_PARALLEL_PANELS:
            sch.reorder(j_outer, i_outer, k, i_inner, j_inner)
            sch.parallel(j_outer)
            tile = i_outer
        else:
            sch.reorder(i_outer, j_outer, k, i_inner, j_inner)
            tile = parallel_tiles(sch, [i_outer, j_outer])
        sch.unroll(i_inner)
        sch.vectorize(j_inner)
        sch.reverse_compute_at(out, tile)
        sch.decompose_reduction(main, k)
        _store_tile(sch, out, tile, panel)
        for block in others:
            parallel_vectorized(sch, block, lanes)
        return True


def _panel_width(block) -> int:
    """Columns per panel of the packed weights (their last dim) the block reads."""
    packed = next(region.source for region in block.reads if len(region.source.shape) == 3)
    return int(packed.shape[2])


def _store_tile(sch: Schedule, out, tile, panel: int) -> None:
    """The tile's store (with the epilogue): rows unrolled, columns vectorised where the output's
    columns are whole panels (no bound check on them)."""
    loops = list(sch.get_loops(out))
    position = next(n for n, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(tile)))
    inside = loops[position + 1:]
    if len(inside) != 2:
        return
    rows, columns = inside
    if isinstance(sch.get(columns).extent, tirx.IntImm) and int(sch.get(columns).extent) == panel:
        sch.vectorize(columns)
