"""CPU matmul schedule rule: dense layers (x times a transposed weight) and batched matmuls (attention), any M.

Two register-blocked micro-kernels, chosen by which of B's axes is contiguous (Goto & van de Geijn,
"Anatomy of high-performance matrix multiplication", 2008, for the register and cache blocking):

- NT, B stored (.., N, K) (nn.Linear's weight as stored, and Q K^T): dot products vectorised over K. A tile
  of MR x NR outputs keeps MR * NR vectors of ``lanes`` partial sums in registers (the k loop split by the
  lanes and rfactored), summed across lanes once at the end of K. Both operands are read along K, so the
  weight is used in the layout it is stored in: no transposed or packed copy of it is made, per call or
  at all. Tiles of B rows sized for the L2 cache run outermost, so each block of weight rows is read once
  from memory and reused by every row tile.
- NN, B stored (.., K, N) (attention's probabilities times V): outer products vectorised over N: MR rows
  by NV lanes of accumulators, per k a broadcast of A and a vector load of B. Where B is computed in the
  function of a batched product (``batched_matmul``'s panel of K^T for Q K^T: K stored along head_dim,
  copied to (.., K, N)), the batch and column tiles run in parallel, each computing its K x NR panel of
  B once, in cache, and then every row tile against it.

Output tiles run in parallel; the epilogue the function was fused with (bias, activation, residual add,
scale) is applied to each tile while it is in registers. The accumulators stay in global scope, compacted
to the tile: TVM puts small global allocations on the stack (registers, for LLVM) and "local" ones in
the workspace, where every update is stored to memory (a BERT-base layer ran 8 to 13% slower so).
M may be symbolic with no divisibility guarantee, K need not be a multiple of the lanes: such extents
are padded (``pad_einsum``: A is copied into a zero-padded buffer, padded outputs are never stored), so
the micro-kernel has no tail.
"""

from __future__ import annotations

import contextlib

from structfx.lowering.compat import Schedule, ScheduleError, Target, tirx, tvm
from structfx.lowering.ops.common import OpScheduleRule, vector_lanes
from structfx.lowering.schedule_rules.analysis import (
    MatmulForm,
    inline_epilogue,
    matmul_form,
    reduces,
    root_blocks,
    single_main_block,
)
from structfx.lowering.schedule_rules.spatial import parallel_vectorized

#: Bytes of B rows kept per parallel block of NT tiles (half of a 512 KiB L2, the rest for A and C).
L2_BLOCK_BYTES = 256 * 1024


def registers(lanes: int) -> int:
    """Vector registers of the ISA with ``lanes`` float32 lanes (16 on AVX2, 32 on AVX-512)."""
    return 32 if lanes >= 16 else 16


def nt_tile(lanes: int) -> tuple[int, int]:
    """(MR, NR) of the dot-product kernel: MR * NR accumulators and MR + NR loads per step fit the
    registers without spilling (LLVM loads all NR rows of B before using them: 4 x 2 on AVX2)."""
    return (6, 3) if registers(lanes) >= 32 else (4, 2)


def nn_tile(lanes: int) -> tuple[int, int]:
    """(MR, vectors) of the outer-product kernel: MR * vectors accumulators, vectors + 1 for loads. On
    AVX2, 4 rows x 2 vectors (8 accumulators, as many as two FMA pipes of latency 4 keep busy): as fast
    as 6 x 2 on attention's products and no padded rows at sequence lengths that are powers of two."""
    return (8, 3) if registers(lanes) >= 32 else (4, 2)


class Matmul(OpScheduleRule):
    """One matmul block per function (legalized ``matmul``/``NT_matmul``, ``batched_matmul``, fused with
    elementwise blocks after it, spatial blocks before it); float32."""

    @staticmethod
    def tile(nt: bool, lanes: int, m, n) -> tuple[int, int]:
        """(MR, NR) of the register tile for M rows and N columns (static ints or symbolic): NR columns
        of B for the dot-product kernel (``nt``), NR floats of a row for the outer-product kernel (all its
        vectors where N is symbolic or a multiple of them, else one). A static extent smaller than the
        tile shrinks it; a static N takes the largest NT tile dividing it. Extents the tile does not
        divide are padded (``_pad``, or by ``batched_matmul`` itself)."""
        if nt:
            mr, nr = nt_tile(lanes)
        else:
            mr, vectors = nn_tile(lanes)
            nr = lanes * vectors if _static(n) is None or _divides(lanes * vectors, n) else lanes
        rows, columns = _static(m), _static(n)
        if rows is not None and rows < mr:
            mr = rows
        divisors = [d for d in range(nr, 1, -1) if columns is not None and columns % d == 0]
        if columns is not None and columns < nr:
            nr = columns
        elif divisors and (nt or divisors[0] == nr):
            nr = divisors[0]
        return mr, nr

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        found = single_main_block(sch, matmul_form)
        if found is None:
            return False
        main, form, last = found
        lanes = vector_lanes(target)
        extents = [iv.dom.extent for iv in sch.get(main).iter_vars]
        if last:
            sch.cache_write(main, 0, "global")  # the tile's copy out: the accumulators stay local
        mr, nr = self.tile(form.nt, lanes, extents[form.i], extents[form.j])
        _pad(sch, main, form, extents, mr, nr, k_multiple=lanes if form.nt else 1)
        out = inline_epilogue(sch, main)
        if out is None:
            return False
        nest = {sch.get(main).name_hint, sch.get(out).name_hint}
        if not _inline_epilogue_inputs(sch, main, out, nest):
            return False
        panel = _panel(sch, main, form) if form.batch and not form.nt else None
        if panel is not None:
            nest.add(sch.get(panel).name_hint)
        others = [b for b in root_blocks(sch) if sch.get(b).name_hint not in nest]
        if form.nt:
            _nt_kernel(sch, main, out, form, mr, nr, lanes, extents)
        else:
            _nn_kernel(sch, main, out, form, mr, nr, panel)
        for block in others:
            parallel_vectorized(sch, block, lanes)
        return True


def _inline_epilogue_inputs(sch: Schedule, main, out, nest: set) -> bool:
    """Inline the blocks that compute inputs of the epilogue (an attention mask or position bias fusion
    put before the matmul) into it, so the epilogue can run inside each tile; False where one cannot be."""
    feeding_main = {sch.get(b).name_hint for b in sch.get_producers(main)}
    others = [b for b in root_blocks(sch) if sch.get(b).name_hint not in nest | feeding_main]
    for block in reversed(others):
        with contextlib.suppress(ScheduleError):
            sch.compute_inline(block)
    producers = {sch.get(b).name_hint for b in sch.get_producers(out)}
    return not producers - nest


def _divides(factor: int, extent) -> bool:
    """Whether ``factor`` provably divides ``extent`` (a padded symbolic extent, ``(m + 5) // 6 * 6``, does)."""
    if isinstance(extent, int):
        return extent % factor == 0
    return tvm.sym.Analyzer().can_prove_equal(tirx.floormod(extent, factor), 0)


def _static(extent) -> int | None:
    if isinstance(extent, int):
        return extent
    return extent.value if isinstance(extent, tirx.IntImm) else None


def _pad(sch: Schedule, main, form: MatmulForm, extents: list, mr: int, nr: int, k_multiple: int) -> None:
    """Pad the block's M, N and K (zero-padded copies of the operands, ``pad_einsum``) where the tile
    (and the K vector, ``k_multiple``) does not divide them; ``batched_matmul`` pads its own."""
    padding = [1] * len(extents)
    for position, factor in ((form.i, mr), (form.j, nr), (form.k, k_multiple)):
        if not _divides(factor, extents[position]):
            padding[position] = factor
    if any(p > 1 for p in padding):
        sch.pad_einsum(main, padding)


def _loops_by_iter(sch: Schedule, block, count: int) -> list:
    """The block's loops, one per iter var in order (the binding is trivial: legalized and padded)."""
    loops = list(sch.get_loops(block))
    return loops[-count:]


def _nt_kernel(sch: Schedule, main, out, form: MatmulForm, mr: int, nr: int, lanes: int, extents: list) -> None:
    loops = _loops_by_iter(sch, main, len(extents))
    k_outer, k_lane = sch.split(loops[form.k], [None, lanes])
    rf = sch.rfactor(k_lane, factor_axis=len(form.batch) + 2)
    loops = list(sch.get_loops(rf))
    loops = loops[-(len(extents) + 1):]
    by_iter = loops[:form.k] + [None] + loops[form.k + 2:]
    k_outer, k_lane = loops[form.k], loops[form.k + 1]
    batch = [by_iter[p] for p in form.batch]
    i_outer, i_inner = sch.split(by_iter[form.i], [None, mr])
    n = _static(extents[form.j])
    n_padded = -(-n // nr) * nr if n is not None else None
    rows_per_block = max(1, L2_BLOCK_BYTES // (4 * max(1, _static(extents[form.k]) or 1)) // nr)
    tiles = n_padded // nr if n_padded is not None else None
    block_tiles = max((d for d in range(1, min(rows_per_block, tiles) + 1) if tiles % d == 0), default=1) \
        if tiles else 1
    if tiles and 1 < block_tiles < tiles:
        # blocks of B rows in parallel, each reused by every row tile
        j_block, j_outer, j_inner = sch.split(by_iter[form.j], [None, block_tiles, nr])
        sch.reorder(*batch, j_block, i_outer, j_outer, k_outer, i_inner, j_inner, k_lane)
        parallel_region(sch, [*batch, j_block])
        tile = j_outer
    else:
        j_outer, j_inner = sch.split(by_iter[form.j], [None, nr])
        sch.reorder(*batch, i_outer, j_outer, k_outer, i_inner, j_inner, k_lane)
        tile = parallel_region(sch, [*batch, i_outer, j_outer])
    sch.unroll(i_inner)
    sch.unroll(j_inner)
    sch.vectorize(k_lane)
    sch.reverse_compute_at(main, tile)
    sch.reverse_compute_at(out, tile)
    sch.decompose_reduction(rf, k_outer)
    for loop in _inside(sch, main, tile):
        sch.unroll(loop)


def _inside(sch: Schedule, block, tile) -> list:
    """The loops of ``block`` inside the loop ``tile``."""
    loops = list(sch.get_loops(block))
    position = next(n for n, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(tile)))
    return loops[position + 1:]


def _panel(sch: Schedule, main, form: MatmulForm):
    """The block that computes B (read along j) in this function for ``main`` alone, spatial, or None.
    Only batched products take it (their parallel loop is batch x column tiles: without a batch, few)."""
    block = sch.get(main)
    j = block.iter_vars[form.j].var
    for producer in sch.get_producers(main):
        written = sch.get(producer).writes
        if len(written) != 1 or reduces(sch.get(producer)) or len(sch.get_consumers(producer)) != 1:
            continue
        for read in block.reads:
            if read.source.same_as(written[0].source) and read.region[-1].min.same_as(j):
                return producer
    return None


def _nn_kernel(sch: Schedule, main, out, form: MatmulForm, mr: int, nr: int, panel=None) -> None:
    """Outer products over N. With a ``panel`` block computing B, the column tiles run in parallel, each
    computing its K x NR panel of B once, then every row tile against it."""
    loops = _loops_by_iter(sch, main, len(form.batch) + 3)
    batch = [loops[p] for p in form.batch]
    i_outer, i_inner = sch.split(loops[form.i], [None, mr])
    j_outer, j_inner = sch.split(loops[form.j], [None, nr])
    if panel is None:
        sch.reorder(*batch, i_outer, j_outer, loops[form.k], i_inner, j_inner)
        tile = parallel_region(sch, [*batch, i_outer, j_outer])
    else:
        sch.reorder(*batch, j_outer, i_outer, loops[form.k], i_inner, j_inner)
        sch.compute_at(panel, parallel_region(sch, [*batch, j_outer]))
        tile = i_outer
    sch.unroll(i_inner)
    sch.vectorize(j_inner)
    sch.reverse_compute_at(out, tile)
    sch.decompose_reduction(main, loops[form.k])
    out_loops = _inside(sch, out, tile)
    if nr > 1 and out_loops and _static(sch.get(out_loops[-1]).extent) == nr:
        sch.vectorize(out_loops[-1])


def parallel_region(sch: Schedule, loops: list):
    """Fuse ``loops`` (outermost first; batch, row tiles, column tiles), symbolic ones included, into one
    parallel loop: one parallel region per call. Returns it. A tile's accumulators stay compacted to the
    tile under the fused loop (checked: a (1, MR, NR) buffer per iteration with symbolic batch and rows),
    where a serial batch loop around a parallel tile loop started one region per batch and row tile (96
    per call of the tiny BERT's attention, each a wake-up of the workers)."""
    tile = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(tile)
    return tile
