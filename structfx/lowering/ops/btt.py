"""BTT kernel: two batched matmuls, the permute between them folded into stage 1's stores.

Stage 1, a batched matmul over the m1 input blocks, stores its result already permuted for stage 2,
``z[b, c, i1] = sum_i0 x[b, i1, i0] w1[i1, i0, c]`` (c = j0 r + s), so that stage 2,
``y[b, j0, j1] = sum_{s, i1} z[b, j0 r + s, i1] w2[j0, i1 r + s, j1] + bias``, reads it contiguously
(read in stage 1's layout, each operand load of stage 2 touched a new page: 2.5x slower). The permuted
stores stay inside each row's block; each stage keeps a (rows x vectors) accumulator tile in registers.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, Target, relax, te
from structfx.lowering.ops.common import (
    OpScheduleRule,
    as_rows,
    find_block,
    from_rows,
    knob,
    last_row,
    named_loops,
    present,
    split_tile,
    tile_multiple,
    value,
    vector_lanes,
)

STAGE1, STAGE2, OUT = "structfx_btt_stage1", "structfx_btt_stage2", "structfx_btt_out"
ROW_TILE = 32  # rows per parallel task
REGISTER_ROWS = 2  # rows of the register accumulator tile
ROW_PAD = 4  # rows are computed in multiples of this: the largest register tile that tuning tries
VECTORS = 4  # vectors of columns in the register accumulator tile


def btt_te(x: te.Tensor, w1: te.Tensor, w2: te.Tensor, bias: te.Tensor | None, tile: int = ROW_PAD) -> te.Tensor:
    """x (B, m1, m0), w1 (m1, m0, r n0), w2 (n0, r m1, n1), bias (n0, n1) -> (B, n0, n1). Both stages
    run on B rounded up to ``tile`` rows (input reads clamped), so register tiles of up to ``tile`` rows
    split them exactly; the padded rows are never stored."""
    rows, m1, m0 = x.shape
    n0, rm1, n1 = w2.shape
    rank = rm1 // m1
    padded = tile_multiple(rows, tile)
    i0 = te.reduce_axis((0, m0), "i0")
    z = te.compute(
        (padded, w1.shape[2], m1),
        lambda b, c, i1: te.sum(x[last_row(b, rows), i1, i0] * w1[i1, i0, c], axis=i0),
        name=STAGE1,
    )
    s, i1 = te.reduce_axis((0, rank), "s"), te.reduce_axis((0, m1), "i1")
    acc = te.compute(
        (padded, n0, n1),
        lambda b, j0, j1: te.sum(z[b, j0 * rank + s, i1] * w2[j0, i1 * rank + s, j1], axis=[s, i1]),
        name=STAGE2,
    )
    if bias is None:
        return te.compute((rows, n0, n1), lambda b, j0, j1: acc[b, j0, j1], name=OUT)
    return te.compute((rows, n0, n1), lambda b, j0, j1: acc[b, j0, j1] + bias[j0, j1], name=OUT)


def convert_btt(node, importer, target: Target):
    x, w1, w2, bias = (None if a is None else importer.env[a] for a in node.args[:4])
    out_features = node.args[4]
    bb = importer.block_builder
    m1, m0, _ = (int(v) for v in importer.shape_of(w1))
    n0, _, n1 = (int(v) for v in importer.shape_of(w2))
    rows, leading = as_rows(importer, x)
    batch, n_in = importer.shape_of(rows)
    if int(n_in) < m0 * m1:
        rows = bb.emit(relax.op.nn.pad(rows, [0, 0, 0, m0 * m1 - int(n_in)]))
    x3 = bb.emit(relax.op.reshape(rows, [batch, m1, m0]))
    if bias is not None:
        if out_features < n0 * n1:
            bias = bb.emit(relax.op.nn.pad(bias, [0, n0 * n1 - out_features]))
        bias = bb.emit(relax.op.reshape(bias, [n0, n1]))
    tile = ROW_PAD if target.kind.name == "llvm" else GPU_ROWS
    y = bb.emit_te(btt_te, x3, w1, w2, bias, tile, primfunc_name_hint="structfx_btt")
    y = bb.emit(relax.op.reshape(y, [batch, n0 * n1]))
    if out_features < n0 * n1:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[out_features]))
    return from_rows(importer, y, leading, out_features)


class BTTCPU(OpScheduleRule):
    """Two parallel batched matmuls over tasks of up to ROW_TILE rows. Each keeps a (REGISTER_ROWS x
    VECTORS vectors) accumulator tile in registers and sweeps its task's rows with one weight block in
    L1, so each weight load serves all of them. The rows are padded to ROW_PAD only: the last task stops
    at the batch's last register tile (a predicate on the tile loop), so a batch of 1 computes 4 rows,
    not ROW_TILE. (Stage 1 computed inside stage 2's row tile was no faster here.)"""

    has_knobs = True

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        stage1, stage2, out = (find_block(sch, name) for name in (STAGE1, STAGE2, OUT))
        if None in (stage1, stage2, out):
            return False
        lanes = vector_lanes(target)
        width1 = int(sch.get(stage1).iter_vars[1].dom.extent)
        n1 = int(sch.get(out).iter_vars[2].dom.extent)
        rank, m1 = (int(sch.get(stage2).iter_vars[i].dom.extent) for i in (3, 4))

        vectors = [lanes, 2 * lanes, 4 * lanes]
        b, c, i1, i0 = sch.get_loops(stage1)
        b_outer, b_mid, b_inner = sch.split(b, [None, *self._row_tile(sch, tunable)])
        c_outer, c_inner = split_tile(sch, c, width1, knob(sch, VECTORS * lanes, vectors, tunable, extent=width1))
        sch.reorder(b_outer, *present(c_outer), i1, b_mid, i0, b_inner, c_inner)
        # tasks over (row tile, column tile), which own separate rows of z; not over i1, whose threads
        # would share z's cache lines. The column tiles keep both threads busy at a batch of 1.
        sch.parallel(sch.fuse(b_outer, c_outer) if c_outer is not None else b_outer)
        _register_tile(sch, stage1, b_mid, b_inner, c_inner, i0)

        b, j0, j1 = sch.get_loops(out)
        rows = self._row_tile(sch, tunable)
        b_outer, b_mid, b_inner = sch.split(b, [None, *rows])
        j1_outer, j1_inner = split_tile(sch, j1, n1, knob(sch, VECTORS * lanes, vectors, tunable, extent=n1))
        sch.reorder(b_outer, j0, *present(j1_outer), b_mid, b_inner, j1_inner)
        sch.parallel(sch.fuse(b_outer, j0))
        sch.vectorize(j1_inner)
        sch.compute_at(stage2, b_mid)
        columns = n1 if j1_outer is None else int(sch.get(j1_inner).extent)
        r_b, r_j1, r_s, r_i1 = named_loops(
            sch, stage2, [("b", value(sch, rows[1])), ("j1", columns), ("s", rank), ("i1", m1)]
        )
        sch.reorder(*present(r_s, r_i1, r_b, r_j1))
        if r_j1 is not None:
            sch.vectorize(r_j1)
        sch.unroll(r_b)
        first_reduction = r_s if r_s is not None else r_i1
        if first_reduction is not None:
            sch.decompose_reduction(stage2, first_reduction)
        return True

    @staticmethod
    def _row_tile(sch: Schedule, tunable: bool) -> list:
        """(register tiles per task, rows per register tile)."""
        rows = knob(sch, REGISTER_ROWS, [2, 4], tunable)
        return [knob(sch, ROW_TILE // REGISTER_ROWS, [4, 8, 16], tunable), rows]

def _register_tile(sch: Schedule, block, rows_loop, row_loop, column_loop, reduction_loop) -> None:
    """Accumulate a (rows x vector columns) tile in registers under ``rows_loop``, then store it."""
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, rows_loop)
    sch.vectorize(column_loop)
    sch.unroll(row_loop)
    sch.decompose_reduction(block, reduction_loop)


class BTTCUDA(OpScheduleRule):
    """Both contractions as thread-block tiles: a block owns GPU_ROWS rows and one input block (stage
    1) or output block (stage 2); its threads own output columns. Stage 2's shared operand (the rows'
    stage-1 slice) is staged once in shared memory; each thread accumulates its GPU_ROWS outputs in
    registers. (Stage 1 reads its input rows, clamped to the batch, from global memory: a shared copy
    of a clamped region has no constant size.)"""

    target_kind = "cuda"

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        stage1, stage2, out = (find_block(sch, name) for name in (STAGE1, STAGE2, OUT))
        if None in (stage1, stage2, out):
            return False
        b, c, i1, i0 = sch.get_loops(stage1)
        _, threads = _thread_tile(sch, b, i1, c)
        sch.reorder(threads, i0)
        sch.reverse_compute_at(sch.cache_write(stage1, 0, "local"), threads)

        b, j0, j1 = sch.get_loops(out)
        blocks, threads = _thread_tile(sch, b, j0, j1)
        sch.compute_at(stage2, threads)
        sch.set_scope(stage2, 0, "local")
        _stage_in_shared(sch, stage2, blocks)
        return True


def _thread_tile(sch: Schedule, rows, group, columns):
    """Blocks over (row tile, group, column tile), threads over columns, each thread over GPU_ROWS rows."""
    row_outer, row_inner = sch.split(rows, [None, GPU_ROWS])
    column_outer, column_inner = sch.split(columns, [None, GPU_THREADS])
    sch.reorder(row_outer, group, column_outer, column_inner, row_inner)
    blocks = sch.fuse(row_outer, group, column_outer)
    sch.bind(blocks, "blockIdx.x")
    sch.bind(column_inner, "threadIdx.x")
    return blocks, column_inner


def _stage_in_shared(sch: Schedule, block, blocks_loop) -> None:
    """Copy the block's first operand into shared memory once per thread block, all threads helping."""
    shared = sch.cache_read(block, 0, "shared")
    sch.compute_at(shared, blocks_loop)
    _, lanes = sch.split(sch.fuse(*sch.get_loops(shared)[1:]), [None, GPU_THREADS])
    sch.bind(lanes, "threadIdx.x")


GPU_ROWS = 8
GPU_THREADS = 64
