"""Sparse max-plus over the channels of a feature map, read where they lie:
``y[a, j, *s] = max(bias[j], max_t x[a, idx[j, t], *s] + w[j, t])`` on x (N, n_in, *spatial).

What ``sparse_maxplus(x, idx, w, b, dim=1)`` (``ChannelMaxPlus``, the ReLU of a conv feature map)
compiles to: for each (image, output channel) the k input channels' spatial maps are contiguous, so each
candidate is a run of vector loads, a broadcast add and a max, vectorised along the spatial axis; no
reshape or copy around the kernel. The channel-last kernel (``structfx.lowering.ops.maxplus``) would need
x transposed to (N * spatial, C) and its result transposed back: two copies of the map around it.
"""

from __future__ import annotations

import functools
import operator

from structfx.lowering.compat import Schedule, Target, relax, te, tirx, tvm
from structfx.lowering.nan_propagation import NAN_EXACT, isnan
from structfx.lowering.ops.common import (
    OpScheduleRule,
    clamp,
    find_block,
    knob,
    plain_leading,
    present,
    split_tile,
    vector_lanes,
)

KERNEL = "structfx_channel_maxplus"
#: The most spatial positions a vectorised run covers (a divisor of the spatial size: no tail to guard).
RUN = 64


def channel_maxplus_te(x: te.Tensor, idx: te.Tensor, w: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    """x (N, n_in, *spatial) -> (N, n_out, *spatial), one spatial block: the k candidates of an output
    (k is static, idx's shape) and the bias are a balanced tree of maxes, NaN when any of them is (torch's
    ``maximum``), so nothing goes through a scratch buffer and a -inf candidate stays -inf (no reduction
    identity). Each candidate appears twice, in the maxes and in the NaN check: the expression grows
    linearly with k (a select per max, each operand read by its NaN check, its compare and its value,
    grew as 5 ** log2(k): k = 8 took a minute to compile)."""
    n_in = x.shape[1]
    n_out, k = (int(d) for d in idx.shape)

    def output(a, j, *s):
        values = [x[(a, clamp(idx[j, t], n_in), *s)] + w[j, t] for t in range(k)]
        if bias is not None:
            values.append(bias(j))
        nan = functools.reduce(tirx.Or, [isnan(v) for v in values])
        while len(values) > 1:
            values = [tirx.max(*values[i:i + 2]) if i + 1 < len(values) else values[i]
                      for i in range(0, len(values), 2)]
        return tirx.Select(nan, tirx.const(float("nan"), x.dtype), values[0])

    return te.compute((x.shape[0], n_out, *x.shape[2:]), output, name=KERNEL)


def _emit(importer, *args):
    """The kernel's call, its PrimFunc marked NaN-exact (``nan_propagation`` leaves it alone: its maxes
    are already guarded, and the pass's ``Let`` bindings would keep TVM's vectorizer off the run)."""
    builder = importer.block_builder
    call = builder.call_te(channel_maxplus_te, *args, primfunc_name_hint=KERNEL)
    gv = call.args[0]
    builder.update_func(gv, builder.get()[gv].with_attr(NAN_EXACT, True))
    return builder.emit(call)


def convert_channel_maxplus(importer, x, idx, w, bias, dim: int):
    """The kernel on x where it lies when the features are dim 1; at a later dim (not the last), on x
    viewed as (outer, n_in, inner) and the result viewed back (reshapes of a contiguous tensor: no copies
    once ``RewriteDataflowReshape`` has run)."""
    if dim == 1:
        return _emit(importer, x, idx, w, bias)
    shape = list(importer.shape_of(x))
    simplify = tvm.sym.Analyzer().simplify
    outer = simplify(functools.reduce(operator.mul, shape[:dim], 1))
    inner = simplify(functools.reduce(operator.mul, shape[dim + 1:], 1))
    x3 = plain_leading(importer, importer.block_builder.emit(relax.op.reshape(x, [outer, shape[dim], inner])))
    y = _emit(importer, x3, idx, w, bias)
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
    """The spatial loops fused into one, split into runs (a divisor of it; a knob when tuning), parallel
    over (image, output channel, run), each run vectorised: k contiguous vector loads, adds and maxes
    and one store. A spatial size known only at run time is left one scalar loop."""

    has_knobs = True

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        block = find_block(sch, KERNEL)
        if block is None:
            return False
        a, j, *spatial = sch.get_loops(block)
        s = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        extent = sch.get(s).extent
        if not isinstance(extent, tirx.IntImm):
            sch.parallel(sch.fuse(a, j))
            return True
        inner = int(extent)
        run = knob(sch, spatial_run(inner, vector_lanes(target)), [8, 16, 32, 64], tunable, extent=inner)
        s_outer, s_inner = split_tile(sch, s, inner, run)
        sch.parallel(sch.fuse(a, j, *present(s_outer)))
        sch.vectorize(s_inner)
        return True


class ChannelMaxPlusCUDA(OpScheduleRule):
    """One thread per output (a, j, *spatial), threads of a block along the spatial axis (coalesced
    loads and stores)."""

    target_kind = "cuda"

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        block = find_block(sch, KERNEL)
        if block is None:
            return False
        blocks, threads = sch.split(sch.fuse(*sch.get_loops(block)), [None, CUDA_THREADS])
        sch.bind(blocks, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
        return True


CUDA_THREADS = 256
