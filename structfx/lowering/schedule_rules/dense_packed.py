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

A single row (batch 1: a matrix-vector product) would waste three quarters of that tile: it runs a GEMV
nest instead, one row by GEMV_PANELS panels (as many accumulators, as many independent FMA chains), groups
of panels in parallel. A symbolic M gets both nests in one function, chosen at run time by an ``if`` on M.
Measured on this host (one thread, CPU time): the GEMV nest 2x faster than the tile at M = 1 (d = 1024
and 4096), the same at M = 2, slower at M = 3 (it reads B once per row).
"""

from __future__ import annotations

from structfx.lowering.compat import MatchBufferRegion, SBlock, SBlockRealize, Schedule, Target, renew_defs, tirx, tvm
from structfx.lowering.ops.common import OpScheduleRule, find_block, vector_lanes
from structfx.lowering.packing import ACCUMULATE, ROWS
from structfx.lowering.schedule_rules.analysis import inline_epilogue, root_blocks, single_main_block
from structfx.lowering.schedule_rules.spatial import parallel_tiles, parallel_vectorized

#: Below this many panels, row tiles run in parallel with the panels (too few panels to share out).
MIN_PARALLEL_PANELS = 8
#: Panels side by side in the GEMV tile (M = 1): one row by this many panels, 2 x GEMV_PANELS accumulators,
#: as many independent FMA chains as the ROWS x 1-panel tile.
GEMV_PANELS = 4


class DensePacked(OpScheduleRule):
    """The ``dense_packed`` kernel with whatever elementwise blocks fusion put after it; float32.

    Two loop nests: the GEMV nest (``_gemv``) for a single row, the GEMM nest (``schedule``) for more. A
    symbolic M gets both, chosen at run time by an ``if`` on M (``_by_rows``); tuning (``tunable``) works
    on the GEMM nest alone, in place."""

    def apply(self, func, target: Target, tunable: bool) -> Schedule | None:
        large = super().apply(func, target, tunable)
        if large is None or tunable:
            return large
        rows = _rows(Schedule(func))
        if not all(isinstance(p.ty, tirx.BufferType) for p in func.params):
            return large  # a scalar parameter could not be matched to the GEMV nest's own (_by_rows)
        small = _gemv(Schedule(renew_defs(func)), target)
        if small is None:
            return large
        if isinstance(rows, tirx.IntImm):
            return small if rows.value == 1 else large
        return Schedule(_by_rows(rows == 1, small.mod["main"], large.mod["main"]))

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        found = single_main_block(sch, lambda block: block.name_hint == ACCUMULATE or None)
        if found is None:
            return False
        main = found[0]
        lanes = vector_lanes(target)
        found = _epilogue(sch, main)
        if found is None:
            return False
        out, others = found
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


def _epilogue(sch: Schedule, main):
    """The epilogue after ``main`` inlined into the output block: (that block, the other blocks left
    outside the nest: the input's stages), or None where it cannot be inlined."""
    out = inline_epilogue(sch, main)
    if out is None:
        return None
    nest = {ACCUMULATE, sch.get(out).name_hint}
    return out, [b for b in root_blocks(sch) if sch.get(b).name_hint not in nest]


def _rows(sch: Schedule):
    """M: the rows of the kernel's input ``a`` (the 2-D buffer its accumulation reads)."""
    block = sch.get(find_block(sch, ACCUMULATE))
    return next(region.source for region in block.reads if len(region.source.shape) == 2).shape[0]


def _gemv(sch: Schedule, target: Target) -> Schedule | None:
    """The GEMV nest: groups of GEMV_PANELS panels in parallel, then each row of the output (one, where it
    is chosen), which computes its accumulators (the row by the group's columns, in registers) over the
    whole of K right before its epilogue: only the M rows are computed, not a padded tile. None where the
    output's columns are not whole groups of panels (of GEMV_PANELS, 2 or 1 panels)."""
    main = find_block(sch, ACCUMULATE)
    found = _epilogue(sch, main)
    if found is None:
        return None
    out, others = found
    panel = _panel_width(sch.get(main))
    rows, columns = sch.get_loops(out)
    n = sch.get(columns).extent
    group = next((g * panel for g in (GEMV_PANELS, 2, 1) if isinstance(n, tirx.IntImm) and n.value % (g * panel) == 0),
                 None)
    if group is None:
        return None
    column_group, column = sch.split(columns, [None, group])
    sch.reorder(column_group, rows, column)
    sch.parallel(column_group)
    sch.compute_at(main, rows)
    _, tile_columns, k = sch.get_loops(main)[-3:]
    panels, lanes = sch.split(tile_columns, [None, panel])
    sch.reorder(k, panels, lanes)
    sch.unroll(panels)
    sch.vectorize(lanes)
    sch.decompose_reduction(main, k)
    sch.vectorize(column)
    for block in others:
        parallel_vectorized(sch, block, vector_lanes(target))
    return sch


def _by_rows(single_row, small: tirx.PrimFunc, large: tirx.PrimFunc) -> tirx.PrimFunc:
    """One function of two scheduled forms of the same function, ``small`` renewed (its own variables and
    buffers, ``renew_defs``): ``small``'s body where ``single_row`` holds, ``large``'s otherwise. ``small``'s
    parameters are matched to ``large``'s whole buffers in a block of its own."""
    whole = [tirx.BufferRegion(p, [tvm.ir.Range(0, d) for d in p.ty.shape]) for p in large.params]
    matched = [MatchBufferRegion(own, region) for own, region in zip(small.params, whole)]
    roots = [f.body.block for f in (small, large)]
    scratch = SBlockRealize([], True, SBlock([], [], [], "gemv_scratch", roots[0].body,
                                             alloc_buffers=roots[0].alloc_buffers))
    gemv = SBlockRealize([], True, SBlock([], [], [], "gemv", scratch, match_buffers=matched))
    root = SBlock([], [], [], "root", tirx.IfThenElse(single_row, gemv, roots[1].body),
                  alloc_buffers=roots[1].alloc_buffers)
    return large.with_body(SBlockRealize([], True, root))
