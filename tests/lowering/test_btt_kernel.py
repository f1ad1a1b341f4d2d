"""The compiled BTT kernel (structfx/lowering/ops/btt.py): numerics against eager BTTLinear at odd and
prime sizes, ranks 1 and 4, batches 1, 7 and 33 of one symbolic-batch build, rows that are an
expression; and the CPU loop nest it promises under a named target (rows padded to ROW_PAD, not to a
whole task of ROW_TILE rows)."""

import pytest
import torch

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, tvm
from structfx.lowering.ops.btt import BTTCPU, OUT, ROW_PAD, ROW_TILE, STAGE1, btt_te
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
    stage 1 has r n0 = 64 columns, two tiles of 4 AVX2 vectors."""
    def dims(*extents):
        return [e if isinstance(e, tirx.Var) else tirx.IntImm("int64", e) for e in extents]

    x = te.placeholder(dims(rows, 8, 16), name="x")
    w1, w2 = te.placeholder(dims(8, 16, 4 * 16), name="w1"), te.placeholder(dims(16, 4 * 8, 8), name="w2")
    bias = te.placeholder(dims(16, 8), name="bias")
    sch = BTTCPU().apply(te.create_prim_func([x, w1, w2, bias, btt_te(x, w1, w2, bias)]), AVX2, False)
    assert sch is not None
    return sch


def test_cpu_kernel_pads_rows_to_the_register_tile_only():
    """At a symbolic batch the scratch rows are B rounded up to ROW_PAD (a batch of 1 computes ROW_PAD
    rows), and stage 1 runs its (row task, column tile) pairs in parallel."""
    rows = tirx.Var("rows", "int64")
    sch = _cpu_schedule(rows)
    update = sch.get_sblock(STAGE1 + "_update")  # the accumulation, after decompose_reduction
    padded = sch.get(update).iter_vars[0].dom.extent
    assert tvm.sym.Analyzer().can_prove_equal(padded, tirx.floordiv(rows + ROW_PAD - 1, ROW_PAD) * ROW_PAD)
    assert ROW_PAD < ROW_TILE
    loops = [sch.get(loop) for loop in sch.get_loops(update)]
    assert loops[0].kind == tirx.ForKind.PARALLEL
    assert "c" in loops[0].loop_var.name  # the column tiles are fused into the parallel loop
    out_loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(OUT))]
    assert out_loops[-1].kind == tirx.ForKind.VECTORIZED
