"""CPU schedule rule for row reductions (softmax, layer norm, RMS norm, mean) and the elementwise blocks
fused around them over the same rows.

A kernel of this kind is a chain of blocks over the same leading row dimensions: reductions over the
row (sum, max), per-row scalars (mean, rsqrt of the variance) and elementwise blocks over the row (the
normalised output). The rule runs every block of one row inside one parallel loop over the rows (the
loop is made serial where the kernel is too small to share: ``structfx.lowering.parallel_grain``), so
a row is read while it is in cache; each reduction is split into ``lanes`` partial accumulators that
run as one vector register over the row (``rfactor``), then summed across the lanes; elementwise
blocks over the row are vectorised. A row length that is not a multiple of ``lanes`` (static or
symbolic: attention's keys) gets its remainder as a scalar loop after the vector one instead of a
predicate inside it, which would keep the loop from being vectorised (see ``RowReduction.apply``). An
elementwise intermediate over the row read by one block is inlined into it; one read by several (softmax's
exp, read by the sum and by the output) is computed once per row into a scratch row, which TIR's lowering
shrinks to one row on the stack of the row loop (as ATen's softmax writes exp into its output row, sums
it, then scales it in place: one exp per element, not two). Per-row scalars are computed once per row;
the partial accumulators are one vector per row, on the stack too.

This is the partial-sum form of vectorised reductions that ATen's CPU kernels use (``vec::reduce_all``
over ``Vectorized<float>`` accumulators in ``aten/src/ATen/native/cpu/SoftMaxKernel.cpp`` and
``layer_norm_kernel.cpp``); TVM's dlight CPU ``Reduction`` rule reduces each row in scalar.
"""

from __future__ import annotations

from structfx.lowering.compat import Schedule, ScheduleError, Target, normalize_prim_func, tirx, tvm
from structfx.lowering.ops.common import OpScheduleRule, vector_lanes
from structfx.lowering.schedule_rules.analysis import root_blocks


class RowReduction(OpScheduleRule):
    """Kernels of row reductions followed by elementwise blocks over the same rows. Applies where every
    block iterates over the same leading row dimensions (any of them symbolic) and then at most over one
    more dimension, the row, which a reduction reduces as the last index of a buffer it reads; the
    function has one output, its last block."""

    def apply(self, func, target: Target, tunable: bool) -> Schedule | None:
        """The rule's schedule (``schedule``) finished without TVM's schedule checks: a row length that
        is not a multiple of the lanes leaves a predicate (``k_outer * lanes + k_inner < length``) on the
        blocks, which TVM cannot prove affine when the length is symbolic, so it refuses to vectorise
        them; each lane of those loops is independent (a partial accumulator, an output element). The
        last vector, which alone needs the predicate, is then peeled off the loop of vectors: by
        ``loop_partition`` where the length is static, by TIR's loop partitioning (lowering) of the
        predicate, hinted ``likely``, where it is symbolic (``loop_partition`` takes static loops only).
        The result is a new Schedule without a trace (``tune`` keeps a rule's own schedule so)."""
        sch = super().apply(func, target, tunable)
        if sch is None:
            return None
        func = sch.mod["main"]
        unchecked = Schedule(func.with_body(_likely(func.body)), enable_check=False)
        for block in _blocks(unchecked):
            if REFUSED not in unchecked.get(block).annotations:
                continue
            unchecked.unannotate(block, REFUSED)
            if unchecked.get(block).init is None:
                unchecked.vectorize(unchecked.get_loops(block)[-1])
            else:
                _vector_partials(unchecked, block)
        while (marked := _marked_loop(unchecked)) is not None:
            whole = int(unchecked.get(marked).annotations[PARTITION])
            unchecked.unannotate(marked, PARTITION)
            unchecked.loop_partition(marked, [whole, None])
        return Schedule(tvm.s_tir.transform.ConvertSSA()(unchecked.mod))  # partitions share their variables

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        roles = _roles(sch, infos)
        if roles is None:
            return False
        try:
            _schedule(sch, *roles, vector_lanes(target))
        except ScheduleError:
            return False
        return True


#: What a block does along the row: reduce over it, compute one value per row, or one per element.
REDUCE, PER_ROW, ELEMENTWISE = "reduce", "per_row", "elementwise"

#: The annotation of a loop over vectors to partition after its whole vectors (see ``_split``).
PARTITION = "structfx.whole_vectors"

#: The annotation of a block whose innermost loop TVM's checks refused to vectorise (see RowReduction.apply).
REFUSED = "structfx.vectorize_unchecked"


def _roles(sch: Schedule, infos) -> tuple[int, dict] | None:
    """(number of row dimensions, each block's role by name), or None where the function is not a chain of
    row blocks: no reduction, a reduction not over the last iter of its block or not over the last index of
    a buffer it reads, blocks over other rows, more than one output or an output that is not the last block."""
    blocks = root_blocks(sch)
    if len(infos) != len(blocks) or len(sch.get_output_blocks(sch.get_sblock("root"))) != 1:
        return None
    reductions = [info for info in infos if "R" in info.dom_kind()]
    if not reductions:
        return None
    first = reductions[0]
    rows = len(first.dom_kind()) - 1
    if rows == 0:
        return None
    written = {region.source for block in blocks for region in sch.get(block).writes}
    extents = [iter_.dom for iter_ in first.iters[:rows]]
    analyzer = tvm.sym.Analyzer()
    kind = {}
    for info in infos:
        kinds = info.dom_kind()
        doms = [iter_.dom for iter_ in info.iters]
        if len(kinds) not in (rows, rows + 1) or "S" * rows != kinds[:rows] or "O" in kinds:
            return None
        if not all(analyzer.can_prove_equal(a, b) for a, b in zip(doms[:rows], extents)):
            return None
        block = sch.get(info.block_rv)
        row_vars = [iv.var for iv in block.iter_vars[:rows]]
        if not all(_indexed_by_rows(region, row_vars) for region in [*block.reads, *block.writes]
                   if region.source in written):
            return None
        if kinds.endswith("R"):
            if not _reduces_last_index(block):
                return None
            kind[block.name_hint] = REDUCE
        else:
            kind[block.name_hint] = ELEMENTWISE if len(kinds) == rows + 1 else PER_ROW
    if sch.get(sch.get_output_blocks(sch.get_sblock("root"))[0]).name_hint != sch.get(blocks[-1]).name_hint:
        return None
    return rows, kind


def _indexed_by_rows(region, row_vars) -> bool:
    """Whether ``region`` is indexed first by ``row_vars``, in order: a block then reads (or writes) what the
    function computes only for its own row."""
    return len(region.region) >= len(row_vars) and all(
        _is_var(r.min, var) and _unit(r.extent) for r, var in zip(region.region, row_vars))


def _reduces_last_index(block) -> bool:
    """Whether ``block`` (one reduction iter) reads some buffer with its reduction variable as the last index."""
    (reduce,) = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return any(len(region.region) and _is_var(region.region[-1].min, reduce) and _unit(region.region[-1].extent)
               for region in block.reads)


def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _unit(extent) -> bool:
    return isinstance(extent, tirx.IntImm) and extent.value == 1


def _schedule(sch: Schedule, rows: int, kind: dict, lanes: int) -> None:
    """Inline the row's elementwise intermediates that one block reads (one that several read is computed
    once per row), split each reduction into ``lanes`` partial accumulators, run every block under one
    parallel loop over the rows, and vectorise the partial accumulators and the elementwise blocks along
    the row."""
    *inner, _ = root_blocks(sch)
    for block in inner:
        name = sch.get(block).name_hint
        consumers = sch.get_consumers(block)
        per_row_use = kind[name] == PER_ROW and len(consumers) == 1 and kind[sch.get(consumers[0]).name_hint] == PER_ROW
        if (kind[name] == ELEMENTWISE and len(consumers) == 1) or per_row_use:
            try:
                sch.compute_inline(block)
            except ScheduleError:
                continue
    partials = []
    for block in root_blocks(sch):
        loop = sch.get_loops(block)[-1]
        if kind[sch.get(block).name_hint] == REDUCE and not _shorter(sch, loop, 2 * lanes):
            lane = _split(sch, loop, lanes)
            partials.append(sch.rfactor(lane, rows))
    row_loops = []
    for block in root_blocks(sch):
        loops = sch.get_loops(block)[:rows]
        row_loops.append(sch.fuse(*loops) if rows > 1 else loops[0])
    row = sch.merge(*row_loops) if len(row_loops) > 1 else row_loops[0]
    sch.parallel(row)
    for partial in partials:
        _vector_partials(sch, partial)
    for block in sch.get_child_blocks(row):
        along = sch.get_loops(block)[1:]
        if kind.get(sch.get(block).name_hint) == ELEMENTWISE and len(along) == 1 and not _shorter(sch, along[0], lanes):
            _vectorize(sch, block, _split(sch, along[0], lanes))


def _split(sch: Schedule, loop, lanes: int):
    """``loop`` split into vectors of ``lanes``; returns the lanes' loop. Where ``lanes`` does not divide a
    static length, the loop over vectors is marked with the number of whole vectors (RowReduction.apply
    partitions it there); a symbolic length is partitioned by TIR's lowering (see ``_likely``)."""
    extent = sch.get(loop).extent
    outer, lane = sch.split(loop, [None, lanes])
    if isinstance(extent, tirx.IntImm) and extent.value % lanes:
        sch.annotate(outer, PARTITION, extent.value // lanes)
    return lane


def _shorter(sch: Schedule, loop, length: int) -> bool:
    extent = sch.get(loop).extent
    return isinstance(extent, tirx.IntImm) and extent.value < length


def _vectorize(sch: Schedule, block, loop) -> None:
    """Vectorise ``loop``, ``block``'s innermost; where TVM's checks refuse, mark the block (RowReduction.apply)."""
    try:
        sch.vectorize(loop)
    except ScheduleError:
        sch.annotate(block, REFUSED, 1)


def _vector_partials(sch: Schedule, partial) -> None:
    """The partial accumulators' block (loops: rows, vectors along the row, lanes) with its lanes vectorised and
    its initialisation (one vector) moved before the loop over the row; where TVM's checks refuse, it is marked
    (RowReduction.apply)."""
    outer, lane = sch.get_loops(partial)[-2:]
    try:
        sch.vectorize(lane)
        sch.decompose_reduction(partial, outer)
    except ScheduleError:
        sch.annotate(partial, REFUSED, 1)


def _marked_loop(sch: Schedule):
    """A loop annotated PARTITION, or None."""
    return next((loop for block in _blocks(sch) for loop in sch.get_loops(block)
                 if PARTITION in sch.get(loop).annotations), None)


def _blocks(sch: Schedule) -> list:
    """The blocks under the function's one row loop (all of them, once scheduled)."""
    return list(sch.get_child_blocks(sch.get_loops(root_blocks(sch)[0])[0]))


def _likely(stmt):
    """``stmt`` with each block predicate ``p`` (a split's ``outer * lanes + inner < length``) written
    ``likely(p)``: TIR's loop partitioning (lowering) then peels the iterations where it may fail off the
    loop, and the loop of whole vectors runs without it."""
    s_tir = tvm.s_tir
    if isinstance(stmt, tirx.For):
        body = _likely(stmt.body)
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                        stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_likely(part) for part in stmt.seq])
    if isinstance(stmt, s_tir.SBlockRealize):
        block = stmt.block
        block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, _likely(block.body),
                             block.init, block.alloc_buffers, block.match_buffers, block.annotations)
        predicate = stmt.predicate
        if not (isinstance(predicate, tirx.IntImm) and predicate.value == 1):
            predicate = tirx.likely(predicate)
        return s_tir.SBlockRealize(stmt.iter_values, predicate, block)
    return stmt

