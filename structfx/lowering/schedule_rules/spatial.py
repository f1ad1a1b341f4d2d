"""Loop nests of spatial (elementwise, broadcast, copy) blocks on the CPU: parallel outside, vectorised inside."""

from __future__ import annotations

from structfx.lowering.compat import Schedule, tirx

#: An innermost loop up to this many vectors long is vectorised whole (LLVM splits it into registers).
WHOLE_VECTORS = 4


def parallel_vectorized(sch: Schedule, block, lanes: int) -> None:
    """Vectorise ``block``'s innermost loop where its extent is static (split into ``lanes`` when it
    is a longer multiple of them, whole when it is at most WHOLE_VECTORS vectors), then fuse all the loops
    outside it, symbolic ones included, into one parallel loop: one parallel region per call (a block
    has no scratch buffer to keep compact, unlike ``parallel_tiles``'s). A parallel loop inside a serial
    loop over batch and sequence would start a region per row: each costs a wake-up of the workers, and
    the tiny BERT of the benchmarks ran 10x slower on 2 threads than on 1 that way. An innermost loop
    that is not vectorised (a symbolic or odd extent: attention's keys) stays a serial loop inside the
    parallel one, which LLVM may vectorise: fused into it, every element would take its indices apart
    with 64-bit divisions by the symbolic extents: attention's masked score add on (8, 2, 32, 32) floats
    took 1.0 ms that way against 0.11 ms, its K transpose 2.3 ms against 0.14 ms (same run, loaded host)."""
    loops = list(sch.get_loops(block))
    if not loops:
        return
    extent = sch.get(loops[-1]).extent
    if isinstance(extent, tirx.IntImm) and extent.value > WHOLE_VECTORS * lanes and extent.value % lanes == 0:
        outer, inner = sch.split(loops[-1], [None, lanes])
        sch.vectorize(inner)
        loops[-1] = outer
    elif isinstance(extent, tirx.IntImm) and 1 < extent.value <= WHOLE_VECTORS * lanes:
        sch.vectorize(loops.pop())
    elif len(loops) > 1:
        loops.pop()
    if loops:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def parallel_tiles(sch: Schedule, loops: list):
    """Fuse ``loops`` (outermost first) from the last one of symbolic extent inward and run the fused
    loop in parallel; loops before it stay serial. Every index taken apart from the fused loop then
    divides by static extents only: a symbolic divisor keeps TVM from compacting a tile's scratch
    buffers (accumulators) to the tile, and they would be allocated and addressed whole. Returns the
    parallel loop."""
    symbolic = [n for n, loop in enumerate(loops) if not isinstance(sch.get(loop).extent, tirx.IntImm)]
    group = loops[symbolic[-1] if symbolic else 0:]
    tile = sch.fuse(*group) if len(group) > 1 else group[0]
    sch.parallel(tile)
    return tile
