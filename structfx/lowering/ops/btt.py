"""BTT kernel: two batched matmuls, the permute between them folded into the second one's indexing.

Stage 1 is a plain batched matmul over the m1 input blocks, ``z[i1, b, c] = sum_i0 x[b, i1, i0]
w1[i1, i0, c]`` (c = j0 r + s); stage 2 reads it permuted, ``y[b, j0, j1] = sum_{i1, s} z[i1, b, j0 r + s]
w2[j0, i1 r + s, j1] + bias``. Both run on one tile of rows at a time, so z never leaves the cache;
each stage keeps a (rows x vector) accumulator tile in registers.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, ScheduleRule, Target, relax, te
from structfx.lowering.converters import register_converter
from structfx.lowering.ops.common import (
    as_rows,
    find_block,
    from_rows,
    named_loops,
    present,
    split_exact,
    vector_lanes,
)

STAGE1, STAGE2, OUT = "structfx_btt_stage1", "structfx_btt_stage2", "structfx_btt_out"
ROW_TILE = 8


def btt_te(x: te.Tensor, w1: te.Tensor, w2: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    """x (B, m1, m0), w1 (m1, m0, r n0), w2 (n0, r m1, n1), bias (n0, n1) -> (B, n0, n1)."""
    rows, m1, m0 = x.shape
    n0, rm1, n1 = w2.shape
    rank = rm1 // m1
    i0 = te.reduce_axis((0, m0), "i0")
    z = te.compute(
        (m1, rows, w1.shape[2]), lambda i1, b, c: te.sum(x[b, i1, i0] * w1[i1, i0, c], axis=i0), name=STAGE1
    )
    u = te.reduce_axis((0, rm1), "u")
    acc = te.compute(
        (rows, n0, n1),
        lambda b, j0, j1: te.sum(z[u // rank, b, j0 * rank + u % rank] * w2[j0, u, j1], axis=u),
        name=STAGE2,
    )
    if bias is None:
        return te.compute(acc.shape, lambda b, j0, j1: acc[b, j0, j1], name=OUT)
    return te.compute(acc.shape, lambda b, j0, j1: acc[b, j0, j1] + bias[j0, j1], name=OUT)


@register_converter("structfx::btt")
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
    y = bb.emit_te(btt_te, x3, w1, w2, bias, primfunc_name_hint="structfx_btt")
    y = bb.emit(relax.op.reshape(y, [batch, n0 * n1]))
    if out_features < n0 * n1:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[out_features]))
    return from_rows(importer, y, leading, out_features)


class BTTCPU(ScheduleRule):
    """Parallel over tiles of ROW_TILE rows. Per tile, stage 1 is computed whole (it stays in cache)
    with (rows x vector) register accumulators; stage 2 and its bias epilogue then run per (output
    block, vector of columns)."""

    def apply(self, func, target: Target, tunable: bool) -> Schedule | None:
        if target.kind.name != "llvm":
            return None
        sch = Schedule(func)
        stage1, stage2, out = (find_block(sch, name) for name in (STAGE1, STAGE2, OUT))
        if None in (stage1, stage2, out):
            return None
        lanes = vector_lanes(target)
        m1, width1, m0 = (int(sch.get(stage1).iter_vars[i].dom.extent) for i in (0, 2, 3))
        n0, n1 = (int(v.dom.extent) for v in sch.get(out).iter_vars[1:])
        rm1 = int(sch.get(stage2).iter_vars[3].dom.extent)

        b, j0, j1 = sch.get_loops(out)
        b_outer, b_inner = sch.split(b, [None, ROW_TILE])
        j1_outer, j1_inner = split_exact(sch, j1, n1, 2 * lanes)
        sch.reorder(b_outer, j0, *present(j1_outer), b_inner, j1_inner)
        sch.parallel(b_outer)
        sch.vectorize(j1_inner)
        columns = n1 if j1_outer is None else int(sch.get(j1_inner).extent)
        sch.compute_at(stage2, j1_outer if j1_outer is not None else j0)
        r_b, r_j1, r_u = named_loops(sch, stage2, [("b", ROW_TILE), ("j1", columns), ("u", rm1)])
        sch.reorder(*present(r_u, r_b, r_j1))
        if r_j1 is not None:
            sch.vectorize(r_j1)
        sch.unroll(r_b)
        if r_u is not None:
            sch.decompose_reduction(stage2, r_u)

        sch.compute_at(stage1, b_outer)
        s_i1, s_b, s_c, s_i0 = named_loops(sch, stage1, [("i1", m1), ("b", ROW_TILE), ("c", width1), ("i0", m0)])
        c_outer, c_inner = split_exact(sch, s_c, width1, 2 * lanes) if s_c is not None else (None, None)
        sch.reorder(*present(s_i1, c_outer, s_i0, s_b, c_inner))
        if c_inner is not None:
            sch.vectorize(c_inner)
        sch.unroll(s_b)
        if s_i0 is not None:
            sch.decompose_reduction(stage1, s_i0)
        return sch
