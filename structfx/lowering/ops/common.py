"""Helpers every op's converter and schedule share."""

from __future__ import annotations

import abc
import functools
import operator

from structfx.lowering.compat import Schedule, ScheduleRule, Target, codegen, relax, tirx, tvm

#: Name prefix of our ops' kernels (their TE computes'); fusion names one with an epilogue fused in
#: ``fused_structfx_*`` (TVM's FuseOps: "fused_" and the names of the functions it merged).
OUR_PREFIX = "structfx_"


def is_ours(kernel_name: str) -> bool:
    """Whether a PrimFunc of that name is one of our ops' kernels, alone or with an epilogue fused in."""
    return kernel_name.startswith((OUR_PREFIX, "fused_" + OUR_PREFIX))


def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's widest usable vector register (8 for AVX2, 16 for AVX-512)."""
    if target.kind.name != "llvm":
        return 32
    with target:
        bits = codegen.llvm_get_vector_width(target)
    if "-avx512f" in list(target.attrs.get("mattr", [])):
        bits = min(bits, 256)
    return max(4, bits // 32)


def clamp(index, extent):
    """An index known to lie in [0, extent): data-dependent reads need it, or compute_at cannot bound
    the region it reads: "Check failed: intset.HasLowerBound() && intset.HasUpperBound()")."""
    return tirx.max(tirx.min(index, extent - 1), 0)


def tile_multiple(rows, tile: int):
    """``rows`` rounded up to a multiple of ``tile``: the row extent of a kernel's scratch buffers, so
    their tiles split exactly (no predicate on the vectorised loop) at any batch; reads of the input
    are clamped to its last row and the padded rows are never stored."""
    return tvm.sym.Analyzer().simplify(tirx.floordiv(rows + (tile - 1), tile) * tile)


def last_row(b, rows):
    """Row ``b`` of an input of ``rows`` rows, clamped into it (the padded rows of tile_multiple)."""
    return tirx.min(b, rows - 1)


def split_exact(sch: Schedule, loop, extent: int, preferred: int):
    """Split ``loop`` by the largest divisor of ``extent`` up to ``preferred``: (outer, inner), or
    (None, loop) where the split would leave a unit loop (a later reorder then fails with "The loops are
    not in a chain because there is a non-single-branch stmt in between")."""
    factor = max(d for d in range(1, min(extent, preferred) + 1) if extent % d == 0)
    if factor <= 1 or factor >= extent:
        return None, loop
    return sch.split(loop, [None, factor])


def knob(sch: Schedule, default: int, candidates: list[int], tunable: bool, extent: int | None = None):
    """A tile size: ``default`` (an int) for the hand schedule; when tuning, a sampled choice among the
    candidates (those that tile ``extent`` into at least two pieces, where it is known)."""
    fitting = [c for c in candidates if extent is None or (1 < c < extent and extent % c == 0)]
    if not tunable or len(fitting) < 2:
        return default
    return sch.sample_categorical(fitting, [1.0 / len(fitting)] * len(fitting))


def value(sch: Schedule, knob_value) -> int:
    """The int a knob has in this schedule (its sampled value when tuning)."""
    return knob_value if isinstance(knob_value, int) else int(sch.get(knob_value))


def split_tile(sch: Schedule, loop, extent: int, factor):
    """Split by a knob: a sampled factor as it is, a fixed one as split_exact does."""
    if isinstance(factor, int):
        return split_exact(sch, loop, extent, factor)
    return sch.split(loop, [None, factor])


def tile_rows_out(sch: Schedule, out, lanes: int, default_columns: int, tunable: bool):
    """The batch-major output ``out[b, j]`` written from a transposed tile: parallel over tiles of
    ``lanes`` rows, vectorised over a knob's worth of columns. Returns (row tile loop, column tile
    loop or None, columns per tile)."""
    n_out = int(sch.get(out).iter_vars[1].dom.extent)
    b, j = sch.get_loops(out)
    b_outer, b_inner = sch.split(b, [None, lanes])
    columns = knob(sch, default_columns, [4, 8, 16, 32], tunable, extent=n_out)
    j_outer, j_inner = split_tile(sch, j, n_out, columns)
    sch.reorder(b_outer, *present(j_outer), b_inner, j_inner)
    sch.parallel(b_outer)
    sch.vectorize(j_inner)
    return b_outer, j_outer, n_out if j_outer is None else int(sch.get(j_inner).extent)


def present(*loops) -> list:
    return [loop for loop in loops if loop is not None]


def named_loops(sch: Schedule, block, dims: list[tuple[str, int]]) -> list:
    """The innermost loops of ``block`` matched to ``dims`` (name, extent), None for a dim of extent 1
    (compute_at leaves no loop for those)."""
    kept = [extent > 1 for _, extent in dims]
    loops = list(sch.get_loops(block))[-sum(kept):] if any(kept) else []
    found = iter(loops)
    return [next(found) if keep else None for keep in kept]


def as_rows(importer, x: relax.Expr) -> tuple[relax.Expr, list]:
    """x (..., n) as rows (B, n), B a plain symbolic var or a constant, and the leading shape to restore
    afterwards (from_rows)."""
    shape = list(importer.shape_of(x))
    leading = shape[:-1]
    if len(shape) != 2:
        rows = tvm.sym.Analyzer().simplify(functools.reduce(operator.mul, leading, 1))  # s*4*4 -> s*16: one form
        x = importer.block_builder.emit(relax.op.reshape(x, [rows, shape[-1]]))
    return plain_leading(importer, x), leading


def plain_leading(importer, x: relax.Expr) -> relax.Expr:
    """x with its leading dim a constant or a plain symbolic var: a compound one (s*16, a transpose's
    rows) is bound to a fresh var ``rows`` by a match_cast. Our kernels pad that dim to a whole number
    of row tiles, and TVM can prove the padded extent covers the rows only for a plain var ("not a stage
    pipeline" in reverse_compute_at for s*16)."""
    shape = list(importer.shape_of(x))
    if isinstance(shape[0], (int, tirx.IntImm, tirx.Var)):
        return x
    rows = tirx.Var("rows", "int64")
    return importer.block_builder.match_cast(x, relax.TensorType([rows, *shape[1:]], x.ty.dtype))


def from_rows(importer, y: relax.Expr, leading: list, width) -> relax.Expr:
    """y (B, width) back to (*leading, width), the leading dims as the input had them."""
    if len(leading) == 1 and tvm.sym.Analyzer().can_prove_equal(importer.shape_of(y)[0], leading[0]):
        return y
    return importer.block_builder.emit(relax.op.reshape(y, [*leading, width]))


def find_block(sch: Schedule, name: str):
    """The block of that name in a schedule, or None: how a rule recognises one of our kernels."""
    try:
        return sch.get_sblock(name)
    except tvm.s_tir.schedule.ScheduleError:  # what get_sblock raises for a name the function lacks
        return None


class OpScheduleRule(ScheduleRule, abc.ABC):
    """A dlight-style schedule rule for one of our kernels on one kind of target. ``schedule`` works on a Schedule
    it is given (MetaSchedule's own when tuning, with ``tunable=True``: knobs are then sampled) and
    returns False where the function is not its kernel."""

    target_kind = "llvm"
    has_knobs = False  # whether tunable=True may sample (tune then checks each kernel: tuning/tasks.py)

    def apply(self, func, target: Target, tunable: bool) -> Schedule | None:
        if target.kind.name != self.target_kind or not isinstance(func, tirx.PrimFunc):
            return None
        sch = Schedule(func)
        return sch if self.schedule(sch, target, tunable) else None

    @abc.abstractmethod
    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        """Schedule ``sch`` in place; False when its function is not this schedule rule's kernel."""
