"""BTT kernel: two batched matmuls, run per tile of rows by the dense layers' GEMM micro-kernel.

Stage 1, a batched matmul over the m1 input blocks, ``z[b, i1, c] = sum_i0 x[b, i1, i0] w1[i1, i0, c]``
(c = j0 r + s); stage 2, ``y[b, j0, j1] = sum_{i1, s} z[b, i1, j0 r + s] w2[j0, i1 r + s, j1] + bias``.
Each row's z stays contiguous (stage 1 stores whole vectors); stage 2 broadcasts its elements one at a
time, so their order costs nothing once the row tile's z is in L1. Both stages run inside one task per
tile of rows, so z never leaves the cache. On the CPU the elementwise ops fusion puts after the kernel
(activation, scale, residual add) run in the same tile, on the accumulators, before the one store.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, Target, relax, te, tirx, tvm
from structfx.lowering.lifting import fusible_with_epilogue
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
    vector_lanes,
)
from structfx.lowering.schedule_rules.analysis import inline_elementwise_epilogue, root_blocks
from structfx.lowering.schedule_rules.spatial import parallel_vectorized

STAGE1, STAGE2, OUT = "structfx_btt_stage1", "structfx_btt_stage2", "structfx_btt_out"
ROWS = 4  # rows of a register tile, and of a parallel task; the batch is padded to a multiple of it
PANEL = 2  # vectors of columns in a register tile: ROWS x PANEL accumulators, as dense_packed's


def btt_te(x: te.Tensor, w1: te.Tensor, w2: te.Tensor, bias: te.Tensor | None, tile: int = ROWS) -> te.Tensor:
    """x (*outer, rows, n_in), n_in <= m1 m0 (the rest read as zeros), w1 (m1, m0, r n0), w2 (n0, r m1, n1), bias
    (n0 n1,) -> (*outer, rows, n0 n1). The rows are x's last leading dim, the other leading dims (batch, ...)
    outer loops: taking and giving x's shape as it is (no reshape to (rows, n) around the kernel) lets fusion
    put the ops on the result (bias, activation, residual add) into the kernel as its epilogue. Both stages
    run on the rows rounded up to ``tile`` (input reads clamped to the last row), so register tiles of ``tile``
    rows split them exactly; the padded rows are never stored."""
    *outer, rows, n_in = x.shape
    m1, m0, _ = w1.shape
    n0, rm1, n1 = w2.shape
    rank = rm1 // m1
    padded = tile_multiple(rows, tile)

    def read(index, b, i):
        value = x[(*index, last_row(b, rows), i)]
        return value if _same(n_in, m1 * m0) else tirx.if_then_else(i < n_in, value, tirx.const(0, x.dtype))

    i0 = te.reduce_axis((0, m0), "i0")

    def stage1(*index):
        *index, b, i1, c = index
        return te.sum(read(index, b, i1 * m0 + i0) * w1[i1, i0, c], axis=i0)

    z = te.compute((*outer, padded, m1, w1.shape[2]), stage1, name=STAGE1)
    i1, s = te.reduce_axis((0, m1), "i1"), te.reduce_axis((0, rank), "s")

    def stage2(*index):
        *index, b, j0, j1 = index
        return te.sum(z[(*index, b, i1, j0 * rank + s)] * w2[j0, i1 * rank + s, j1], axis=[i1, s])

    acc = te.compute((*outer, padded, n0, n1), stage2, name=STAGE2)

    def out(*index):
        *index, b, j = index
        value = acc[(*index, b, j // n1, j % n1)]
        return value if bias is None else value + bias[j]

    return te.compute((*outer, rows, n0 * n1), out, name=OUT)


def _same(a, b) -> bool:
    return tvm.sym.Analyzer().can_prove_equal(a, b)


def convert_btt(node, importer, target: Target):
    """On the CPU the kernel takes x as it is and is marked fusible with the elementwise ops after it, unless x
    is 1-D or 2-D, or its last leading dim is a static extent that padding to the row tile would grow by more
    than a quarter ((B, 1, n), (B, 3, n)): then, and on CUDA (whose rule schedules the kernel alone), it takes
    x as rows (B', n), reshaped."""
    x, w1, w2, bias = (None if a is None else importer.env[a] for a in node.args[:4])
    out_features = node.args[4]
    bb = importer.block_builder
    n0, _, n1 = (int(v) for v in importer.shape_of(w2))
    cpu = target.kind.name == "llvm"
    tile = ROWS if cpu else GPU_ROWS
    shape = list(importer.shape_of(x))
    whole = cpu and len(shape) > 2 and not (
        isinstance(shape[-2], tirx.IntImm) and -(-int(shape[-2]) // tile) * tile * 4 > int(shape[-2]) * 5)
    leading = None
    if not whole:
        x, leading = as_rows(importer, x)
    if bias is not None and out_features < n0 * n1:
        bias = bb.emit(relax.op.nn.pad(bias, [0, n0 * n1 - out_features]))
    call = bb.call_te(btt_te, x, w1, w2, bias, tile, primfunc_name_hint="structfx_btt")
    y = bb.emit(fusible_with_epilogue(bb, call) if cpu else call)
    if out_features < n0 * n1:
        axis = len(importer.shape_of(y)) - 1
        y = bb.emit(relax.op.strided_slice(y, axes=[axis], begin=[0], end=[out_features]))
    return y if whole else from_rows(importer, y, leading, out_features)


class BTTCPU(OpScheduleRule):
    """The dense GEMM micro-kernel (``schedule_rules/dense_packed.py``) on both stages, one parallel task per
    tile of ROWS rows: the task computes its rows' stage-1 result (ROWS x m1 x r n0 floats, in cache), then
    stage 2 and the bias from it. Each stage accumulates a (ROWS x PANEL vectors) register tile over its
    contraction (broadcast one element of each row, one load of the weights' next PANEL vectors, ROWS x
    PANEL FMAs a step) and stores it once. The weights need no packing: each block of w1 (m0, r n0) and w2
    (r m1, n1) is already (K, N) with N contiguous, and small enough to stay in L1. The accumulators are a
    "global" scratch buffer compacted to the tile (on the stack, kept in registers by LLVM; a "local" one
    would be allocated whole from the workspace, every FMA stored to memory: dense_packed.py). Rows are
    padded to ROWS only (a batch of one computes ROWS rows); the padded rows are never stored."""

    has_knobs = True

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        stage1, stage2, out = (find_block(sch, name) for name in (STAGE1, STAGE2, OUT))
        if None in (stage1, stage2, out):
            return False
        names = [sch.get(block).name_hint for block in root_blocks(sch)]
        before = root_blocks(sch)[:names.index(STAGE1)]
        found = inline_elementwise_epilogue(sch, stage2, sch.get(out).writes[0].source.shape)
        if found is None or found[0] is None:
            return False
        out, after = found
        lanes = vector_lanes(target)
        m1, width1, m0 = (_extent(sch, stage1, n) for n in (-3, -2, -1))
        n1, rank = _extent(sch, stage2, -3), _extent(sch, stage2, -1)

        outer, b, j0, j1 = _output_loops(sch, out, n1)
        b_tile, b_row = sch.split(b, [None, ROWS])
        j1_tile, j1_lane = split_tile(sch, j1, n1, _panel(sch, lanes, n1, tunable))
        sch.reorder(*outer, b_tile, j0, *present(j1_tile), b_row, j1_lane)
        b_tile = sch.fuse(*outer, b_tile) if outer else b_tile
        sch.parallel(b_tile)
        sch.unroll(b_row)
        sch.vectorize(j1_lane)
        tile = j1_tile if j1_tile is not None else j0
        sch.compute_at(stage2, tile)
        columns = n1 if j1_tile is None else int(sch.get(j1_lane).extent)
        r_b, r_j1, r_i1, r_s = named_loops(sch, stage2, [("b", ROWS), ("j1", columns), ("i1", m1), ("s", rank)])
        _micro_kernel(sch, stage2, [r_i1, r_s], r_b, r_j1)

        sch.compute_at(stage1, b_tile)
        s_b, s_i1, s_c, s_i0 = named_loops(sch, stage1, [("b", ROWS), ("i1", m1), ("c", width1), ("i0", m0)])
        c_tile, c_lane = split_tile(sch, s_c, width1, _panel(sch, lanes, width1, tunable))
        sch.reorder(*present(s_i1, c_tile, s_i0, s_b, c_lane))
        store = sch.cache_write(stage1, 0, "global")
        sch.reverse_compute_at(store, c_tile if c_tile is not None else s_i1 if s_i1 is not None else b_tile)
        _micro_kernel(sch, stage1, [s_i0], s_b, c_lane)
        store_loops = sch.get_loops(store)
        sch.vectorize(store_loops[-1])
        for block in before + after:  # the input's stages fusion put first, the ops after the epilogue
            parallel_vectorized(sch, block, lanes)
        return True


def _output_loops(sch: Schedule, out, n1: int) -> tuple:
    """The output's loops as ([outer leading dims], rows, j0, j1): its columns split by n1."""
    *outer, rows, columns = sch.get_loops(out)
    j0, j1 = sch.split(columns, [None, n1])
    return outer, rows, j0, j1


def _extent(sch: Schedule, block, n: int) -> int:
    return int(sch.get(block).iter_vars[n].dom.extent)


def _panel(sch: Schedule, lanes: int, extent: int, tunable: bool):
    """Columns of the register tile: PANEL vectors (a knob of one or two vectors when tuning)."""
    return knob(sch, PANEL * lanes, [lanes, 2 * lanes], tunable, extent=extent)


def _micro_kernel(sch: Schedule, block, reductions: list, rows, columns) -> None:
    """The register tile: the contraction outermost, then the rows (unrolled), then the columns
    (vectorised); its accumulators zeroed before the contraction."""
    sch.reorder(*present(*reductions, rows, columns))
    if rows is not None:
        sch.unroll(rows)
    if columns is not None:
        sch.vectorize(columns)
    first = next((loop for loop in reductions if loop is not None), None)
    if first is not None:
        sch.decompose_reduction(block, first)


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
        b, i1, c, i0 = sch.get_loops(stage1)
        _, threads = _thread_tile(sch, b, i1, c)
        sch.reorder(threads, i0)
        sch.reverse_compute_at(sch.cache_write(stage1, 0, "local"), threads)

        _, b, j0, j1 = _output_loops(sch, out, _extent(sch, stage2, 2))  # x is 2-D here (convert_btt)
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
