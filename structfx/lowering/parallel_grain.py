"""A grain size for the CPU kernels' parallel loops: a loop with too little work runs serially.

Starting a parallel region hands its tasks to TVM's thread pool and waits for the slowest worker; on
small work that costs more than the work (the tiny BERT of the benchmarks ran 3x slower on two threads
than on one). ``at::parallel_for`` in PyTorch runs serially below a grain size (``at::internal::
GRAIN_SIZE``, 32768 elements); OpenMP writes the same decision as ``#pragma omp parallel for if(...)``.
This pass makes that decision for every parallel loop of the scheduled kernels: at compile time where the
loop's work is static, at run time where it depends on a symbolic size (the batch, a sequence length),
by a guard that picks between the parallel loop and the same loop run serially.

Work is counted in scalar block executions: the product of the loop extents down to each block (vector
lanes included), summed over the blocks under the loop; one matmul block execution is one multiply-add,
one elementwise block execution is one element.
"""

from __future__ import annotations

from structfx.lowering.compat import tirx, tvm

#: Scalar block executions below which a parallel region costs more than it saves. Measured with
#: benchmarks/bench_parallel_grain.py on the 2-core AVX2 host shared with other jobs: a region cost ~10 us
#: to start, parallel elementwise kernels first won at 4M elements, matmuls not below 16M multiply-adds
#: (they tied from there); 4M (2^22) also ran the tiny BERT fastest at batch 1 and 8. ATen's grain size,
#: 32768 elements, assumes idle cores and left the tiny BERT 4x slower than this one.
GRAIN = 1 << 22

#: The PassContext config to build guarded kernels with. TIR's common-subexpression elimination sees the same
#: vector predicate in both branches of a guard, binds it once, and fails on the vector bool ("IntImm can only
#: take scalar, but boolx16 was supplied", a slice_scatter kernel); LLVM eliminates the common subexpressions
#: of the generated code anyway.
BUILD_CONFIG = {"tirx.disable_cse_tir": True}


def apply_parallel_grain(mod, target, grain: int = GRAIN):
    """``mod`` with every parallel loop of its scheduled PrimFuncs run serially when its work is below
    ``grain`` scalar block executions: replaced by a serial loop where the work is static, guarded by
    ``if work >= grain`` (parallel loop, else the same loop serial) where it is symbolic. A loop whose
    work depends on variables bound inside it stays parallel. Only CPU (``llvm``) targets are changed.
    Returns a new IRModule; definitions duplicated by the guard are renamed (``s_tir.ConvertSSA``, on the
    guarded functions alone: on a kernel with two symbolic parameters of one name, DeBERTa's relative
    attention, it re-declared a scratch buffer inside each block and the build failed). Build it
    inside ``tvm.transform.PassContext(config=BUILD_CONFIG)``."""
    if target.kind.name != "llvm":
        return mod
    changed = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            body = _guard(func.body, grain)
            if not body.same_as(func.body):
                changed[gv] = func.with_body(body)
    if not changed:
        return mod
    renamed = tvm.s_tir.transform.ConvertSSA()(tvm.IRModule(changed))
    return tvm.IRModule({**dict(mod.functions_items()), **dict(renamed.functions_items())}, attrs=mod.attrs)


def _guard(stmt, grain: int, scratch: dict | None = None):
    """``stmt`` with each outermost parallel loop under it decided by its work (see apply_parallel_grain).
    ``scratch``: the enclosing block's allocated buffers, each with the number of blocks that access it."""
    s_tir = tvm.s_tir
    if isinstance(stmt, tirx.For):
        if stmt.kind == tirx.ForKind.PARALLEL:
            return _decide(stmt, grain, scratch or {})
        body = _guard(stmt.body, grain, scratch)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_guard(s, grain, scratch) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _guard(stmt.block, grain)
        return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, s_tir.SBlock):
        accesses = _accesses(stmt.body)
        scratch = {buffer: accesses.get(buffer, 0) for buffer in stmt.alloc_buffers}
        body = _guard(stmt.body, grain, scratch)
        return stmt if body.same_as(stmt.body) else s_tir.SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init, stmt.alloc_buffers,
            stmt.match_buffers, stmt.annotations)
    if isinstance(stmt, tirx.IfThenElse):
        then_case = _guard(stmt.then_case, grain, scratch)
        else_case = None if stmt.else_case is None else _guard(stmt.else_case, grain, scratch)
        unchanged = then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case))
        return stmt if unchanged else tirx.IfThenElse(stmt.condition, then_case, else_case)
    return stmt


def _decide(loop, grain: int, scratch: dict):
    """The parallel ``loop`` itself, its serial twin, or ``if work >= grain: loop else: twin``. A loop with symbolic
    work that alone accesses scratch buffers of the enclosing block (a matmul's accumulators) stays parallel:
    behind a guard both branches would use them, and TVM would allocate them whole, outside both branches,
    instead of one tile per task (nn.Linear(4096) at batch 1 ran 1.5x slower so)."""
    inner: list = []
    work = tvm.sym.Analyzer().simplify(_work(loop, inner))
    serial = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                      loop.annotations)
    if isinstance(work, tirx.IntImm):
        return loop if work.value >= grain else serial
    bound_inside = {var.same_as for var in inner}
    if any(check(var) for var in tirx.analysis.undefined_vars(work) for check in bound_inside):
        return loop
    inside = _accesses(loop)
    if any(inside.get(buffer, 0) == count > 0 for buffer, count in scratch.items()):
        return loop
    return tirx.IfThenElse(work >= tirx.IntImm("int64", grain), loop, serial)


def _accesses(stmt) -> dict:
    """How many blocks under ``stmt`` read or write each buffer (from the blocks' declared regions)."""
    counts: dict = {}
    for block in _blocks(stmt):
        for buffer in {region.source for region in [*block.reads, *block.writes]}:
            counts[buffer] = counts.get(buffer, 0) + 1
    return counts


def _blocks(stmt):
    """Every SBlock under ``stmt``, outermost first."""
    s_tir = tvm.s_tir
    if isinstance(stmt, s_tir.SBlockRealize):
        stmt = stmt.block
    if isinstance(stmt, s_tir.SBlock):
        yield stmt
    if isinstance(stmt, tirx.SeqStmt):
        for part in stmt.seq:
            yield from _blocks(part)
    elif isinstance(stmt, tirx.IfThenElse):
        yield from _blocks(stmt.then_case)
        if stmt.else_case is not None:
            yield from _blocks(stmt.else_case)
    elif hasattr(stmt, "body") and isinstance(stmt.body, tirx.Stmt):
        yield from _blocks(stmt.body)


def _work(stmt, inner: list):
    """Scalar block executions of ``stmt`` (int64 expression); the variables it binds go to ``inner``."""
    s_tir = tvm.s_tir
    if isinstance(stmt, tirx.For):
        inner.append(stmt.loop_var)
        return stmt.extent.astype("int64") * _work(stmt.body, inner)
    if isinstance(stmt, tirx.SeqStmt):
        total = tirx.IntImm("int64", 0)
        for part in stmt.seq:
            total = total + _work(part, inner)
        return total
    if isinstance(stmt, s_tir.SBlockRealize):
        return _work(stmt.block, inner)
    if isinstance(stmt, s_tir.SBlock):
        inner.extend(iv.var for iv in stmt.iter_vars)
        return _work(stmt.body, inner)
    if isinstance(stmt, tirx.IfThenElse):
        else_work = tirx.IntImm("int64", 0) if stmt.else_case is None else _work(stmt.else_case, inner)
        return _work(stmt.then_case, inner) + else_work
    if isinstance(stmt, tirx.Bind):
        inner.append(stmt.var)
        return tirx.IntImm("int64", 0)
    if hasattr(stmt, "body") and isinstance(stmt.body, tirx.Stmt):
        return _work(stmt.body, inner)
    return tirx.IntImm("int64", 1)
