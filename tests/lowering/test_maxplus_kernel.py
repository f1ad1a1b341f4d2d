"""The compiled sparse max-plus kernel (structfx/lowering/ops/maxplus.py): numerics against eager
SparseMaxPlus at widths that split into whole vectors and prime ones, batches 1, 7 and 33 of one
symbolic-batch build; and the CPU loop nest it promises under a named target (the input tile read a
vector of a row at a time where the rows split into whole vectors)."""

import pytest
import torch

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx
from structfx.lowering.ops.maxplus import OUT, TILE, MaxPlusCPU, maxplus_te
from structfx.nn import SparseMaxPlus

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})
LANES = 8


@pytest.mark.parametrize("n_in, n_out, k", [(64, 40, 3), (37, 23, 2), (8, 13, 8)],
                         ids=["whole_vectors", "primes", "one_vector"])
def test_matches_eager_at_any_batch(n_in, n_out, k):
    layer = SparseMaxPlus(n_in, n_out, k=k, init="paper", generator=torch.Generator().manual_seed(0)).eval()
    compiled = sfx.compile(layer, torch.randn(5, n_in))
    for batch in (1, 7, 33):
        x = torch.randn(batch, n_in)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-6, msg=f"batch {batch}")


def _cpu_schedule(n_in: int):
    rows = tirx.Var("rows", "int64")
    x = te.placeholder([rows, tirx.IntImm("int64", n_in)], name="x")
    idx = te.placeholder([tirx.IntImm("int64", 24), tirx.IntImm("int64", 2)], name="idx", dtype="int64")
    w = te.placeholder([tirx.IntImm("int64", 24), tirx.IntImm("int64", 2)], name="w")
    bias = te.placeholder([tirx.IntImm("int64", 24)], name="bias")
    sch = MaxPlusCPU().apply(te.create_prim_func([x, idx, w, bias, maxplus_te(x, idx, w, bias, LANES)]), AVX2, False)
    assert sch is not None
    return sch


def _loops(sch, name):
    return [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name))]


def test_cpu_input_tile_reads_whole_vectors_of_rows():
    """n_in = 32: the tile's innermost loop runs along x's row (its index, vectorised, LANES long), the
    tile's LANES rows unrolled around it; all inside the parallel loop over row tiles."""
    sch = _cpu_schedule(32)
    tile = _loops(sch, TILE)
    assert tile[0].kind == tirx.ForKind.PARALLEL
    *_, vectors, rows, lanes = tile
    assert int(vectors.extent) == 32 // LANES  # x's row in vectors, outside the tile's rows
    assert (rows.kind, int(rows.extent)) == (tirx.ForKind.UNROLLED, LANES)
    assert (lanes.kind, int(lanes.extent)) == (tirx.ForKind.VECTORIZED, LANES)
    assert _loops(sch, OUT)[-1].kind == tirx.ForKind.VECTORIZED


def test_cpu_input_tile_of_a_prime_width_gathers_by_rows():
    """n_in = 37 does not split into vectors: the tile is vectorised over its LANES rows instead."""
    sch = _cpu_schedule(37)
    *_, columns, lanes = _loops(sch, TILE)
    assert int(columns.extent) == 37 and columns.kind == tirx.ForKind.SERIAL
    assert (lanes.kind, int(lanes.extent)) == (tirx.ForKind.VECTORIZED, LANES)
