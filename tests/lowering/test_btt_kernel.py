"""The compiled BTT kernel (structfx/lowering/ops/btt.py): numerics against eager BTTLinear at odd and
prime sizes, ranks 1 and 4, batches 1, 7 and 33 of one symbolic-batch build, rows that are an
expression; and the CPU loop nest it promises under a named target (rows padded to the register tile's
ROWS only, one parallel task per row tile running both stages, register tiles of PANEL vectors)."""

import pytest
import torch

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, tvm
from structfx.lowering.ops.btt import BTTCPU, OUT, PANEL, ROWS, STAGE1, STAGE2, btt_te
from structfx.nn import BTTLinear

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def _layer(n_in: int, n_out: int, rank: int, bias: bool = True) -> BTTLinear:
    torch.manual_seed(0)
    layer = BTTLinear(n_in, n_out, rank=rank, bias=bias).eval()
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("n_in, n_out, rank, bias", [(37, 53, 1, True), (61, 47, 4, True), (96, 80, 4, False)],
                         ids=["primes_r1", "primes_r4", "even_r4_nobias"])
def test_matches_eager_at_any_batch(n_in, n_out, rank, bias):
    layer = _layer(n_in, n_out, rank, bias)
    compiled = sfx.compile(layer, torch.randn(5, n_in))
    for batch in (1, 7, 33):
        x = torch.randn(batch, n_in)
        with torch.no_grad():
            assert _relative(compiled(x), layer(x)) < 1e-5, batch


def test_rows_that_are_an_expression():
    """(B, 3, n): the kernel's rows are B*3, bound to a plain var before the kernel pads them."""
    layer = _layer(40, 24, 4)
    compiled = sfx.compile(layer, torch.randn(2, 3, 40))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 40)
        with torch.no_grad():
            assert _relative(compiled(x), layer(x)) < 1e-5, batch


def _cpu_schedule(rows):
    """The kernel as the Relax converter emits it (int64 shapes): m0 = n0 = 16, m1 = n1 = 8, rank 4:
    stage 1 has r n0 = 64 columns, four register tiles of PANEL AVX2 vectors."""
    def dims(*extents):
        return [e if isinstance(e, tirx.Var) else tirx.IntImm("int64", e) for e in extents]

    x = te.placeholder(dims(rows, 8 * 16), name="x")
    w1, w2 = te.placeholder(dims(8, 16, 4 * 16), name="w1"), te.placeholder(dims(16, 4 * 8, 8), name="w2")
    bias = te.placeholder(dims(16 * 8), name="bias")
    sch = BTTCPU().apply(te.create_prim_func([x, w1, w2, bias, btt_te(x, w1, w2, bias)]), AVX2, False)
    assert sch is not None
    return sch


def _loops(sch, name):
    return [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name))]


def test_cpu_kernel_pads_rows_to_the_register_tile_only():
    """At a symbolic batch the scratch rows are B rounded up to ROWS (a batch of 1 computes ROWS rows), and
    one parallel loop over the row tiles runs both stages and the output."""
    rows = tirx.Var("rows", "int64")
    sch = _cpu_schedule(rows)
    update = sch.get_sblock(STAGE1 + "_update")  # the accumulation, after decompose_reduction
    padded = sch.get(update).iter_vars[0].dom.extent
    assert tvm.sym.Analyzer().can_prove_equal(padded, tirx.floordiv(rows + ROWS - 1, ROWS) * ROWS)
    tasks = [_loops(sch, name)[0] for name in (STAGE1 + "_update", STAGE2 + "_update", OUT)]
    assert tasks[0].kind == tirx.ForKind.PARALLEL
    assert all(loop.same_as(tasks[0]) for loop in tasks)
    assert tvm.sym.Analyzer().can_prove_equal(tasks[0].extent, tirx.floordiv(rows + ROWS - 1, ROWS))


def test_cpu_stages_are_register_tiles():
    """Each stage's accumulation ends in ROWS unrolled rows by PANEL vectorised AVX2 vectors, its
    contraction outside them; stage 1's tile is stored to its own (contiguous) rows by a vectorised loop."""
    sch = _cpu_schedule(tirx.Var("rows", "int64"))
    for name in (STAGE1 + "_update", STAGE2 + "_update"):
        *_, reduction, row, column = _loops(sch, name)
        assert reduction.kind == tirx.ForKind.SERIAL
        assert (row.kind, int(row.extent)) == (tirx.ForKind.UNROLLED, ROWS)
        if name.startswith(STAGE1):
            assert (column.kind, int(column.extent)) == (tirx.ForKind.VECTORIZED, PANEL * 8)
        else:  # stage 2 has n1 = 8 columns: one vector
            assert (column.kind, int(column.extent)) == (tirx.ForKind.VECTORIZED, 8)
    store = _loops(sch, STAGE1 + "_global")
    assert store[-1].kind == tirx.ForKind.VECTORIZED
    assert _loops(sch, OUT)[-1].kind == tirx.ForKind.VECTORIZED
