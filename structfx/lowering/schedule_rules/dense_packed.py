"""CPU schedule rule for dense layers on packed weights (``structfx.lowering.packing.dense_packed``), any M.

The GEMM micro-kernel of Goto & van de Geijn ("Anatomy of high-performance matrix multiplication",
2008) on B packed into panels of P columns, (N / P, K, P), P two vectors: a register tile of R rows of A
by one panel keeps R x 2 accumulators in vector registers (R = ROWS = 4: 8 accumulators, two loads of B
and a broadcast of A; R = TALL_ROWS = 6: 12 accumulators, still within AVX2's 16 registers); per step of
k it broadcasts one element of each A row and loads the panel's next P contiguous values of B. Panels run
in parallel, outermost; inside one, every row tile streams the same panel, which stays in L2 (K x P
floats: 256 KiB at K = 4096 on AVX2), while A's rows come from L3. The nest is the output's (with the
epilogue fused after the layer: bias, activation, residual add, scale), tiled; each tile computes its
accumulators over the whole of K, then applies the epilogue and stores the tile once. The tile's
accumulators stay in the "global" scope the compaction shrinks to the tile: TVM's LowerTVMBuiltin puts
only small *global* allocations on the stack, where LLVM keeps them in registers; a "local" one is
allocated from the workspace and every FMA's result is stored to memory (2.9x slower measured inside the
compiled module). Only the tiles the output needs are computed, each a whole tile (``dense_packed``
pads the accumulation to a multiple of every tile height and re-reads A's last row for the padded rows,
never stored): a symbolic M needs no tail loop and no copy of A.

Tiles of 6 rows run from TALL_FROM rows on, tiles of 4 below. A single row (batch 1: a matrix-vector
product) would waste three quarters of a tile: it runs a GEMV nest instead, one row by GEMV_PANELS panels
(as many accumulators, as many independent FMA chains), groups of panels in parallel. A symbolic M gets
the three nests in one function, chosen at run time by ``if``s on M. Measured on this host (one thread, CPU
time): the GEMV nest 2x faster than the tile at M = 1 (d = 1024 and 4096), the same at M = 2, slower at
M = 3 (it reads B once per row).

The tiles run at the FMA ceiling of this 2-core AVX2 host (measured with the process at real-time
priority, ``chrt -f 1``, so the host's other jobs did not interfere; M = 256, d = 1024): 87-93 GFLOP/s on
one core with 4-row tiles, against 98 with everything in L1 (K = 128), and 150-185 GFLOP/s on both. 6-row
tiles against 4-row ones, two threads, in the same runs: 1.06x at M = 256 (d = 1024 and 4096), 1.08x at
M = 64 (0.98x in a second run), 1.02x at M = 16, but 0.92x at M = 32 and 0.8x at M = 7 and 8 (their
padded rows); earlier runs at M = 256 gave 0.98-1.08x. Alternatives timed at M = 256 and not kept: 5-row
tiles (no better than 6); k unrolled by 4 the same (LLVM unrolls it by 2 already, no spills); groups of
2, 4 or 8 panels inside each row tile (N blocked for L2, A's tile reused from L1) 0.91-0.98x; row tiles
outermost the same at d = 1024, 0.35x at d = 4096; K blocked by 256 or 1024 0.9x; blocks of 16 row tiles
outermost 0.84x.
"""

from __future__ import annotations

from structfx.lowering.compat import MatchBufferRegion, SBlock, SBlockRealize, Schedule, Target, renew_defs, tirx, tvm
from structfx.lowering.ops.common import OpScheduleRule, find_block, vector_lanes
from structfx.lowering.packing import ACCUMULATE
from structfx.lowering.schedule_rules.analysis import inline_epilogue, root_blocks, single_main_block
from structfx.lowering.schedule_rules.spatial import parallel_vectorized

#: Rows of A per register tile below TALL_FROM rows, and in the nest tuning gets: 4 x 2 vectors, 8
#: accumulators, enough independent FMA chains for two FMA pipes of latency 4 (AVX2).
ROWS = 4
#: Rows per register tile from TALL_FROM rows on: 6 x 2 vectors, 12 accumulators, fewer loads of B per FMA.
TALL_ROWS = 6
#: M from which tiles of TALL_ROWS rows run (measured, see the module docstring).
TALL_FROM = 64
#: Below this many panels, row tiles run in parallel with the panels (too few panels to share out).
MIN_PARALLEL_PANELS = 8
#: Panels side by side in the GEMV tile (M = 1): one row by this many panels, 2 x GEMV_PANELS accumulators,
#: as many independent FMA chains as the ROWS x 1-panel tile.
GEMV_PANELS = 4


class DensePacked(OpScheduleRule):
    """The ``dense_packed`` kernel with whatever elementwise blocks fusion put after it; float32.

    Three loop nests: the GEMV nest (``_gemv``) for a single row, tiles of ROWS rows (``schedule``) below
    TALL_FROM rows, tiles of TALL_ROWS rows from there. A symbolic M gets all three, chosen at run time by
    ``if``s on M (``_by_rows``); tuning (``tunable``) works on the ROWS nest alone, in place."""

    def apply(self, func, target: Target, tunable: bool) -> Schedule | None:
        short = super().apply(func, target, tunable)
        if short is None or tunable:
            return short
        rows = _rows(Schedule(func))
        if isinstance(rows, tirx.IntImm):
            chosen = (_gemv(Schedule(func), target) if rows.value == 1
                      else _tiles(func, target, TALL_ROWS) if rows.value >= TALL_FROM else None)
            return short if chosen is None else chosen
        if not all(isinstance(p.ty, tirx.BufferType) for p in func.params):
            return short  # a scalar parameter could not be matched to the other nests' own (_by_rows)
        forms = [(rows == 1, "gemv", _gemv(Schedule(renew_defs(func)), target)),
                 (rows >= TALL_FROM, "tall_tiles", _tiles(renew_defs(func), target, TALL_ROWS))]
        branches = [(condition, name, form.mod["main"]) for condition, name, form in forms if form is not None]
        return Schedule(_by_rows(branches, short.mod["main"])) if branches else short

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        return _schedule_tiles(sch, target, ROWS)


def _tiles(func, target: Target, rows: int) -> Schedule | None:
    """``func`` scheduled in tiles of ``rows`` rows (``_schedule_tiles``), or None."""
    sch = Schedule(func)
    return sch if _schedule_tiles(sch, target, rows) else None


def _schedule_tiles(sch: Schedule, target: Target, rows: int) -> bool:
    """The output's nest in tiles of ``rows`` rows by one panel, panels in parallel outermost (or with the
    row tiles, where they are few); each tile computes its accumulators over the whole of K (rows
    unrolled, the panel's columns vectorised), then applies the epilogue to them. False where ``sch``'s
    function is not the kernel."""
    found = single_main_block(sch, lambda block: block.name_hint == ACCUMULATE or None)
    if found is None:
        return False
    main = found[0]
    found = _epilogue(sch, main)
    if found is None:
        return False
    out, others = found
    panel = _panel_width(sch.get(main))
    panels = int(sch.get(sch.get_loops(main)[1]).extent) // panel
    i, j = sch.get_loops(out)
    whole_panels = int(sch.get(j).extent) % panel == 0
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_inner = sch.split(j, [None, panel])
    if panels >= MIN_PARALLEL_PANELS:
        sch.reorder(j_outer, i_outer, i_inner, j_inner)
        sch.parallel(j_outer)
        tile = i_outer
    else:
        sch.reorder(i_outer, j_outer, i_inner, j_inner)
        sch.parallel(i_outer)
        tile = j_outer
    sch.compute_at(main, tile)
    tile_rows, tile_columns, k = sch.get_loops(main)[-3:]
    sch.reorder(k, tile_rows, tile_columns)
    sch.unroll(tile_rows)
    sch.vectorize(tile_columns)
    sch.decompose_reduction(main, k)
    if whole_panels:  # no bound check on the stored columns
        sch.vectorize(j_inner)
    for block in others:
        parallel_vectorized(sch, block, vector_lanes(target))
    return True


def _panel_width(block) -> int:
    """Columns per panel of the packed weights (their last dim) the block reads."""
    packed = next(region.source for region in block.reads if len(region.source.shape) == 3)
    return int(packed.shape[2])


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


def _by_rows(branches: list, otherwise: tirx.PrimFunc) -> tirx.PrimFunc:
    """One function of several scheduled forms of the same function: the body of the first of ``branches``
    (condition on M, name, form renewed: its own variables and buffers, ``renew_defs``) whose condition
    holds, ``otherwise``'s body where none does. Each branch's parameters are matched to ``otherwise``'s
    whole buffers in a block of its own, named after the branch."""
    whole = [tirx.BufferRegion(p, [tvm.ir.Range(0, d) for d in p.ty.shape]) for p in otherwise.params]
    body = otherwise.body.block.body
    for condition, name, form in reversed(branches):
        matched = [MatchBufferRegion(own, region) for own, region in zip(form.params, whole)]
        root = form.body.block
        scratch = SBlockRealize([], True, SBlock([], [], [], f"{name}_scratch", root.body,
                                                 alloc_buffers=root.alloc_buffers))
        body = tirx.IfThenElse(condition, SBlockRealize([], True, SBlock([], [], [], name, scratch,
                                                                         match_buffers=matched)), body)
    root = SBlock([], [], [], "root", body, alloc_buffers=otherwise.body.block.alloc_buffers)
    return otherwise.with_body(SBlockRealize([], True, root))
