"""Sparse max-plus kernel: ``y[b, j] = max(bias[j], max_t x[b, idx[j, t]] + w[j, t])``.

Vectorised over the batch, not over outputs (AVX gathers are slow): each tile of ``lanes`` rows is
transposed into an (n_in, lanes) scratch buffer, so each (j, t) is one contiguous vector load, a broadcast
add and a max; the result tile is transposed back while it is still in cache. The bias is a separate
elementwise max (``te.max(init=...)`` would drop it: tvm_notes.md). Any batch: the scratch buffers are
padded to whole tiles (reads clamped), and only the last tile's stores are guarded.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, Target, te
from structfx.lowering.ops.channel_maxplus import convert_channel_maxplus
from structfx.lowering.ops.common import (
    OpScheduleRule,
    as_rows,
    clamp,
    find_block,
    from_rows,
    last_row,
    named_loops,
    present,
    tile_multiple,
    tile_rows_out,
    vector_lanes,
)

TILE, CANDIDATES, OUT = "structfx_maxplus_tile", "structfx_maxplus", "structfx_maxplus_out"
OUT_COLUMNS = 8  # outputs per transposed-back tile


def maxplus_te(x: te.Tensor, idx: te.Tensor, w: te.Tensor, bias: te.Tensor | None, tile: int) -> te.Tensor:
    """x (B, n_in) -> (B, n_out); the transposed scratch buffers have B rounded up to ``tile`` rows."""
    rows, n_in = x.shape
    n_out, k = idx.shape
    padded = tile_multiple(rows, tile)
    tiled = te.compute((n_in, padded), lambda i, b: x[last_row(b, rows), i], name=TILE)
    t = te.reduce_axis((0, k), "t")
    best = te.compute(
        (n_out, padded), lambda j, b: te.max(tiled[clamp(idx[j, t], n_in), b] + w[j, t], axis=t), name=CANDIDATES
    )
    if bias is None:
        return te.compute((rows, n_out), lambda b, j: best[j, b], name=OUT)
    return te.compute((rows, n_out), lambda b, j: te.max(best[j, b], bias[j]), name=OUT)


def convert_maxplus(node, importer, target: Target):
    """``sparse_maxplus(x, idx, w, b, dim)``: over the last dim, this file's kernel on x's rows; over any
    other (a feature map's channels), ``structfx.lowering.ops.channel_maxplus`` on x where it lies."""
    x, idx, w, bias = (None if a is None else importer.env[a] for a in node.args[:4])
    dim = node.args[4] if len(node.args) > 4 else node.kwargs.get("dim", -1)
    ndim = len(importer.shape_of(x))
    if dim % ndim != ndim - 1:
        return convert_channel_maxplus(importer, x, idx, w, bias, dim % ndim)
    rows, leading = as_rows(importer, x)
    y = importer.block_builder.emit_te(
        maxplus_te, rows, idx, w, bias, vector_lanes(target), primfunc_name_hint="structfx_sparse_maxplus"
    )
    return from_rows(importer, y, leading, importer.shape_of(idx)[0])


class MaxPlusCPU(OpScheduleRule):
    """Parallel over row tiles; per tile the input transpose, the candidates of each block of outputs
    and their transpose back run on cache-resident scratch buffers."""

    has_knobs = True

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        tile, best, out = (find_block(sch, name) for name in (TILE, CANDIDATES, OUT))
        if tile is None or best is None or out is None:
            return False
        lanes = vector_lanes(target)
        b_outer, j_outer, columns = tile_rows_out(sch, out, lanes, OUT_COLUMNS, tunable)
        sch.compute_at(best, j_outer if j_outer is not None else b_outer)
        j_best, b_best, t_best = named_loops(sch, best, [("j", columns), ("b", lanes), ("t", k_of(sch, best))])
        sch.reorder(*present(j_best, t_best), b_best)
        sch.vectorize(b_best)
        if t_best is not None:
            sch.decompose_reduction(best, t_best)
        sch.compute_at(tile, b_outer)
        _transpose_in(sch, tile, lanes)
        return True


def _transpose_in(sch: Schedule, tile, lanes: int) -> None:
    """The input tile's transpose: each of its rows of x read a vector at a time (contiguous loads, lanes
    stored apart), where x's rows split into whole vectors; else each column of the tile gathered from
    ``lanes`` rows, lane by lane (1.5-2x slower at n_in = 512: every lane's clamped row index is
    computed in a vector, then extracted)."""
    i, b = sch.get_loops(tile)[-2:]
    if int(sch.get(i).extent) % lanes:
        sch.vectorize(b)
        return
    i_outer, i_inner = sch.split(i, [None, lanes])
    sch.reorder(i_outer, b, i_inner)
    sch.unroll(b)
    sch.vectorize(i_inner)


def k_of(sch: Schedule, block) -> int:
    return int(sch.get(block).iter_vars[2].dom.extent)


class MaxPlusCUDA(OpScheduleRule):
    """One thread per output (b, j), threads of a block along j (coalesced stores); the transposed tile
    is inlined away and each thread keeps its running max in a register."""

    target_kind = "cuda"

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        tile, best, out = (find_block(sch, name) for name in (TILE, CANDIDATES, OUT))
        if tile is None or best is None or out is None:
            return False
        sch.compute_inline(tile)
        b, j = sch.get_loops(out)
        blocks, threads = sch.split(sch.fuse(b, j), [None, THREADS])
        sch.bind(blocks, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
        sch.compute_at(best, threads)
        sch.set_scope(best, 0, "local")
        return True


THREADS = 256
