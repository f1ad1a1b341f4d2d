"""Max-plus pooling kernel: ``y[n, c, i, j] = max_{p, q} x[n, c, i*s + p*d - pad, ...] + se[c, p, q]``,
padded positions -inf (never winning), the same output size rule as ``nn.MaxPool2d``."""

from __future__ import annotations

from structfx.errors import StructfxError
from structfx.lowering.compat import Schedule, Target, te, tirx
from structfx.lowering.ops.common import OpScheduleRule, find_block
from structfx.nn.maxplus_pool import pooled_size

POOL = "structfx_maxplus_pool2d"


def maxplus_pool_te(x: te.Tensor, se: te.Tensor, stride, padding, dilation, ceil_mode: bool) -> te.Tensor:
    n, c, height, width = x.shape
    _, kh, kw = (int(v) for v in se.shape)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = pooled_size(int(height), kh, sh, ph, dh, ceil_mode)
    ow = pooled_size(int(width), kw, sw, pw, dw, ceil_mode)
    p, q = te.reduce_axis((0, kh), "p"), te.reduce_axis((0, kw), "q")
    minus_inf = tirx.const(float("-inf"), x.dtype)

    def window(b, ch, i, j):
        h, w = i * sh + p * dh - ph, j * sw + q * dw - pw
        inside = tirx.all(h >= 0, h < height, w >= 0, w < width)
        clamped = x[b, ch, tirx.max(tirx.min(h, height - 1), 0), tirx.max(tirx.min(w, width - 1), 0)]
        return te.max(tirx.if_then_else(inside, clamped, minus_inf) + se[ch, p, q], axis=[p, q])

    return te.compute((n, c, oh, ow), window, name=POOL)


def convert_maxplus_pool(node, importer, target: Target):
    x, se = importer.env[node.args[0]], importer.env[node.args[1]]
    stride, padding, dilation, ceil_mode = node.args[2:6]
    shape = list(importer.shape_of(x))
    if not all(isinstance(d, int) or hasattr(d, "value") for d in shape[2:]):
        raise StructfxError("max-plus pooling needs static H and W: export with a fixed image size")
    return importer.block_builder.emit_te(
        maxplus_pool_te, x, se, stride, padding, dilation, ceil_mode, primfunc_name_hint=POOL
    )


class MaxPlusPoolCPU(OpScheduleRule):
    """Parallel over (image, channel, output row); the window max runs over each output row."""

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        pool = find_block(sch, POOL)
        if pool is None:
            return False
        n, c, i, j, p, q = sch.get_loops(pool)
        sch.reorder(n, c, i, p, q, j)
        sch.parallel(sch.fuse(n, c, i))
        sch.decompose_reduction(pool, p)
        return True


class MaxPlusPoolCUDA(OpScheduleRule):
    """One thread per output element; the window max runs in the thread."""

    target_kind = "cuda"

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        pool = find_block(sch, POOL)
        if pool is None:
            return False
        n, c, i, j, p, q = sch.get_loops(pool)
        blocks, threads = sch.split(sch.fuse(n, c, i, j), [None, 256])
        sch.bind(blocks, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
        return True
