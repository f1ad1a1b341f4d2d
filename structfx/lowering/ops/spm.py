"""SPM kernel: every stage fused in one kernel over a cache-resident tile of rows.

A tile of ``lanes`` rows is transposed into an (N, lanes) scratch buffer and each stage runs on it,
vectorised over the tile's rows: ``h[i] <- self[l, i] h[i] + other[l, i] h[partner[l, i]]``, where
(self, other) is (a, b) for the first coordinate of a pair and (d, c) for the second. The per-coordinate
coefficients are computed once per call by a small kernel; partners are constants of the model.
"""

from __future__ import annotations

import numpy as np

from structfx.lowering.compat import Schedule, Target, relax, te, tirx
from structfx.lowering.ops.common import (
    OpScheduleRule,
    as_rows,
    clamp,
    find_block,
    from_rows,
    last_row,
    tile_multiple,
    tile_rows_out,
    vector_lanes,
)
from structfx.nn.spm_pairing import stage_permutations

INPUT, OUTPUT, COEFFICIENTS = "structfx_spm_in", "structfx_spm_out", "structfx_spm_coefficients"
OUT_COLUMNS = 8


def stage_name(stage: int) -> str:
    return f"structfx_spm_stage{stage}"


def stage_blocks(sch: Schedule) -> list:
    """The stage blocks of an SPM kernel, in order."""
    stages = []
    while (block := find_block(sch, stage_name(len(stages)))) is not None:
        stages.append(block)
    return stages


def pairing_tables(width: int, stages: int, pairing: str, seed: int) -> tuple[np.ndarray, ...]:
    """(partner, pair index, is-second) per stage and coordinate, int32 (L, N) each."""
    perms = stage_permutations(width, stages, pairing, seed)
    partner, pair, second = (np.empty((stages, width), np.int32) for _ in range(3))
    for l, perm in enumerate(perms):
        p, q = perm[0::2], perm[1::2]
        partner[l, p], partner[l, q] = q, p
        pair[l, p] = pair[l, q] = np.arange(width // 2)
        second[l, p], second[l, q] = 0, 1
    return partner, pair, second


def coefficients_te(coeffs: te.Tensor, pair: te.Tensor, second: te.Tensor, variant: str):
    """(self, other) multipliers per stage and coordinate: (a, b) for a pair's first coordinate, (d, c)
    for its second; a rotation is (cos, -sin) and (cos, sin)."""
    stages, width = pair.shape

    def self_entry(l, i):
        k = pair[l, i]
        if variant == "orthogonal":
            return tirx.cos(coeffs[l, k])
        return tirx.if_then_else(second[l, i] == 1, coeffs[l, 3, k], coeffs[l, 0, k])

    def other_entry(l, i):
        k = pair[l, i]
        if variant == "orthogonal":
            sin = tirx.sin(coeffs[l, k])
            return tirx.if_then_else(second[l, i] == 1, sin, -sin)
        return tirx.if_then_else(second[l, i] == 1, coeffs[l, 2, k], coeffs[l, 1, k])

    return (
        te.compute((stages, width), self_entry, name=COEFFICIENTS),
        te.compute((stages, width), other_entry, name=COEFFICIENTS + "_other"),
    )


def spm_te(x, d_in, self_coef, other_coef, partner, d_out, bias, out_features: int, tile: int):
    """Stages on the transposed rows h[i, b] (B rounded up to ``tile`` rows, reads clamped); returns
    y (B, out_features)."""
    rows, n_in = x.shape
    stages, width = (int(v) for v in partner.shape)
    h = te.compute(
        (width, tile_multiple(rows, tile)),
        lambda i, b: tirx.if_then_else(
            i < n_in, x[last_row(b, rows), tirx.min(i, n_in - 1)] * d_in[i], tirx.const(0.0, x.dtype)
        ),
        name=INPUT,
    )
    for l in range(stages):
        h = _stage(h, l, self_coef, other_coef, partner, width)

    def out(b, j):
        value = h[j, b] * d_out[j]
        return value if bias is None else value + bias[j]

    return te.compute((rows, out_features), out, name=OUTPUT)


def _stage(h, l: int, self_coef, other_coef, partner, width: int):
    def mix(i, b):
        return self_coef[l, i] * h[i, b] + other_coef[l, i] * h[clamp(partner[l, i], width), b]

    return te.compute(h.shape, mix, name=stage_name(l))


def convert_spm(node, importer, target: Target):
    x, d_in, coeffs, d_out, bias = (None if a is None else importer.env[a] for a in node.args[:5])
    variant, pairing, seed, out_features = node.args[5:9]
    width = int(importer.shape_of(d_in)[0])
    stages = int(importer.shape_of(coeffs)[0])
    partner, pair, second = (relax.const(t) for t in pairing_tables(width, stages, pairing, seed))
    bb = importer.block_builder
    coefficients = bb.emit_te(coefficients_te, coeffs, pair, second, variant, primfunc_name_hint=COEFFICIENTS)
    self_coef, other_coef = (bb.emit(relax.TupleGetItem(coefficients, i)) for i in range(2))
    rows, leading = as_rows(importer, x)
    y = bb.emit_te(
        spm_te, rows, d_in, self_coef, other_coef, partner, d_out, bias, out_features, vector_lanes(target),
        primfunc_name_hint="structfx_spm",
    )
    return from_rows(importer, y, leading, out_features)


class SPMCPU(OpScheduleRule):
    """Parallel over row tiles; the input transpose, every stage and the output transpose of one tile
    run back to back on (N, lanes) scratch buffers (not L passes of the whole tensor through memory)."""

    has_knobs = True

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        out, first = find_block(sch, OUTPUT), find_block(sch, INPUT)
        if out is None or first is None:
            return False
        b_outer, _, _ = tile_rows_out(sch, out, vector_lanes(target), OUT_COLUMNS, tunable)
        for block in reversed([first, *stage_blocks(sch)]):
            sch.compute_at(block, b_outer)
            sch.vectorize(sch.get_loops(block)[-1])
        return True


class SPMCoefficientsCPU(OpScheduleRule):
    """The small per-call coefficient kernel: (L, N) elements, parallel over stages."""

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        blocks = [find_block(sch, COEFFICIENTS), find_block(sch, COEFFICIENTS + "_other")]
        if None in blocks:
            return False
        for block in blocks:
            sch.parallel(sch.get_loops(block)[0])
        return True


class SPMCUDA(OpScheduleRule):
    """One thread block per batch row, every stage in ONE kernel: the row's N coordinates live in shared
    memory (dynamic, so buffers of stages that are done are reused), each stage is one pass of the
    block's threads over the coordinates, with a barrier between stages."""

    target_kind = "cuda"

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        out, first = find_block(sch, OUTPUT), find_block(sch, INPUT)
        if out is None or first is None:
            return False
        b, j = sch.get_loops(out)
        sch.bind(b, "blockIdx.x")
        j_outer, j_inner = sch.split(j, [None, THREADS])
        sch.bind(j_inner, "threadIdx.x")
        for block in reversed([first, *stage_blocks(sch)]):
            sch.compute_at(block, b)
            sch.set_scope(block, 0, "shared.dyn")
            i = sch.get_loops(block)[-1]
            _, i_inner = sch.split(i, [None, THREADS])
            sch.bind(i_inner, "threadIdx.x")
        return True


THREADS = 256
