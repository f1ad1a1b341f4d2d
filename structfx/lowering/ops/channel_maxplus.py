"""Sparse max-plus over the channels of a feature map, read where they lie:
``y[a, j, s] = max(bias[j], max_t x[a, idx[j, t], s] + w[j, t])`` on x (outer, n_in, inner).

What ``sparse_maxplus(x, idx, w, b, dim=1)`` (``ChannelMaxPlus``, the ReLU of a conv feature map
(N, C, *spatial)) compiles to: for each (image, output channel) the k input channels' spatial rows are
contiguous, so each candidate is a run of vector loads, a broadcast add and a max, vectorised along the
spatial axis. The channel-last kernel (``structfx.lowering.ops.maxplus``) would need x transposed to
(N * spatial, C) and its result transposed back: two copies of the map around it.
"""

from __future__ import annotations

import functools
import operator

from structfx.lowering.compat import Schedule, Target, relax, te, tirx, tvm
from structfx.lowering.ops.common import (
    OpScheduleRule,
    clamp,
    find_block,
    knob,
    named_loops,
    plain_leading,
    split_tile,
    value,
    vector_lanes,
)

CANDIDATES, OUT = "structfx_channel_maxplus", "structfx_channel_maxplus_out"
#: The most spatial positions a vectorised run covers (a divisor of the spatial size: no tail to guard).
RUN = 64


def channel_maxplus_te(x: te.Tensor, idx: te.Tensor, w: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    """x (outer, n_in, inner) -> (outer, n_out, inner). The bias is a separate elementwise max
    (``te.max(init=...)`` would drop it: tvm_notes.md); without one that block copies the candidates."""
    outer, n_in, inner = x.shape
    n_out, k = idx.shape
    t = te.reduce_axis((0, k), "t")
    best = te.compute(
        (outer, n_out, inner),
        lambda a, j, s: te.max(x[a, clamp(idx[j, t], n_in), s] + w[j, t], axis=t),
        name=CANDIDATES,
    )
    if bias is None:
        return te.compute((outer, n_out, inner), lambda a, j, s: best[a, j, s], name=OUT)
    return te.compute((outer, n_out, inner), lambda a, j, s: te.max(best[a, j, s], bias[j]), name=OUT)


def convert_channel_maxplus(importer, x, idx, w, bias, dim: int):
    """x (..., n_in at ``dim``, ...) viewed as (outer, n_in, inner), the kernel, and the result viewed back
    (reshapes of a contiguous tensor: no copies once ``RewriteDataflowReshape`` has run)."""
    shape = list(importer.shape_of(x))
    simplify = tvm.sym.Analyzer().simplify
    outer = simplify(functools.reduce(operator.mul, shape[:dim], 1))
    inner = simplify(functools.reduce(operator.mul, shape[dim + 1:], 1))
    x3 = plain_leading(importer, importer.block_builder.emit(relax.op.reshape(x, [outer, shape[dim], inner])))
    y = importer.block_builder.emit_te(channel_maxplus_te, x3, idx, w, bias, primfunc_name_hint=CANDIDATES)
    n_out = importer.shape_of(idx)[0]
    return importer.block_builder.emit(relax.op.reshape(y, [*shape[:dim], n_out, *shape[dim + 1:]]))


def spatial_run(inner: int, lanes: int) -> int:
    """The vectorised run along the spatial axis: the whole axis up to RUN positions, else its largest
    divisor up to RUN that is a multiple of ``lanes`` (56 x 56 -> 64), else its largest divisor up to RUN
    (14 x 14 -> 49: LLVM splits a 49-lane vector into 6 whole ones and one lane)."""
    if inner <= RUN:
        return inner
    divisors = [d for d in range(1, RUN + 1) if inner % d == 0]
    whole = [d for d in divisors if d % lanes == 0]
    return max(whole or divisors)


class ChannelMaxPlusCPU(OpScheduleRule):
    """Parallel over (outer, output channel); per pair, runs of the spatial axis (a knob when tuning: a
    divisor of it) each computed as k vector candidate updates into a cache-resident buffer and the
    bias max stored from it. A spatial size known only at run time is split into runs of ``lanes``, left
    scalar (the last run is guarded)."""

    has_knobs = True

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        best, out = find_block(sch, CANDIDATES), find_block(sch, OUT)
        if best is None or out is None:
            return False
        lanes = vector_lanes(target)
        a, j, s = sch.get_loops(out)
        extent = sch.get(s).extent
        static = isinstance(extent, tirx.IntImm)
        if static:
            inner = int(extent)
            run = knob(sch, spatial_run(inner, lanes), [8, 16, 32, 64], tunable, extent=inner)
            s_outer, s_inner = split_tile(sch, s, inner, run)
            run = value(sch, run) if s_outer is not None else inner
        else:
            s_outer, s_inner = sch.split(s, [None, lanes])
            run = lanes
        sch.parallel(sch.fuse(a, j))
        if static:
            sch.vectorize(s_inner)
        sch.compute_at(best, s_outer if s_outer is not None else sch.get_loops(out)[0])
        k = int(sch.get(best).iter_vars[3].dom.extent)
        s_best, t_best = named_loops(sch, best, [("s", run), ("t", k)])
        if t_best is None:  # k = 1: no reduction loop left
            return True
        if s_best is not None:
            sch.reorder(t_best, s_best)
            if static:
                sch.vectorize(s_best)
        init = sch.decompose_reduction(best, t_best)
        if static and s_best is not None:
            sch.vectorize(sch.get_loops(init)[-1])
        return True


class ChannelMaxPlusCUDA(OpScheduleRule):
    """One thread per output (a, j, s), threads of a block along s (coalesced loads and stores); each
    thread keeps its running max in a register."""

    target_kind = "cuda"

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        best, out = find_block(sch, CANDIDATES), find_block(sch, OUT)
        if best is None or out is None:
            return False
        blocks, threads = sch.split(sch.fuse(*sch.get_loops(out)), [None, CUDA_THREADS])
        sch.bind(blocks, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
        sch.compute_at(best, threads)
        sch.set_scope(best, 0, "local")
        return True


CUDA_THREADS = 256
