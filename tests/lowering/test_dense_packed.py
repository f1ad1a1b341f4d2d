"""Dense layers on weights packed at compile time (structfx/lowering/packing.py) and their schedule rule
(structfx/lowering/schedule_rules/dense_packed.py): numerics against torch at odd and prime sizes, batch 1 and
symbolic rows, the loop nest the rule promises under named targets, and packing done once."""

import types

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Schedule, Target, te, tirx, tvm
from structfx.lowering.ops.common import vector_lanes
from structfx.lowering.packing import ACCUMULATE, dense_packed
from structfx.lowering.schedule_rules.dense_packed import (
    GEMV_PANELS,
    ROWS,
    TALL_FROM,
    TALL_ROWS,
    DensePacked,
    _gemv,
    _tiles,
)

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})
AVX512 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


def packed_dense(m, n, k, panel):
    """relu(x @ w.T + bias) on w packed in panels of ``panel`` columns, as fusion leaves a Linear + ReLU."""
    x = te.placeholder((m, k), name="x")
    packed = te.placeholder((-(-n // panel), k, panel), name="packed")
    bias = te.placeholder((n,), name="bias")
    y = dense_packed(x, packed, n)
    out = te.compute((m, n), lambda i, j: te.max(y[i, j] + bias[j], tirx.const(0.0, "float32")), name="relu")
    return te.create_prim_func([x, packed, bias, out])


def pack_numpy(w: np.ndarray, panel: int) -> np.ndarray:
    n, k = w.shape
    padded = np.zeros((-(-n // panel) * panel, k), "float32")
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(-1, panel, k).transpose(0, 2, 1))


def run_against_torch(lib, m, n, k):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    dev = tvm.cpu()
    arrays = [x.numpy(), pack_numpy(w.numpy(), 16), b.numpy(), np.zeros((m, n), "float32")]
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    want = torch.relu(x @ w.T + b)
    assert float((torch.from_numpy(args[-1].numpy()) - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("m,n,k", [(1, 130, 97), (7, 97, 130), (33, 16, 33), (6, 256, 64), (1, 96, 97), (1, 48, 131),
                                   (1, 192, 13), (67, 97, 130), (97, 256, 31)])
def test_rule_matches_torch_at_odd_and_prime_sizes(m, n, k):
    """Row tiles (M > 1, or columns not whole panels; TALL_ROWS rows from TALL_FROM rows on) and the GEMV
    nest (M = 1: groups of 1, 2 or 4 panels)."""
    assert TALL_FROM <= 67
    sch = DensePacked().apply(packed_dense(m, n, k, 16), AVX2, False)
    assert sch is not None
    run_against_torch(tvm.compile(sch.mod, target=AVX2), m, n, k)


def test_symbolic_rows_choose_the_nest_at_run_time():
    """One build for any M: ``if``s on M, the GEMV nest (in a block of its own) for one row, tiles of
    TALL_ROWS rows (in a block of their own) from TALL_FROM rows, tiles of ROWS rows otherwise; all match
    torch, on either side of each bound."""
    m = tirx.Var("m", "int64")
    sch = DensePacked().apply(packed_dense(m, 96, 97, 16), AVX2, False)
    branch = sch.mod["main"].body.block.body
    assert isinstance(branch, tirx.IfThenElse) and str(branch.condition) == "m == T.int64(1)"
    assert branch.then_case.block.name_hint == "gemv"
    tall = branch.else_case
    assert isinstance(tall, tirx.IfThenElse) and str(tall.condition) == f"m >= T.int64({TALL_FROM})"
    assert tall.then_case.block.name_hint == "tall_tiles"
    lib = tvm.compile(sch.mod, target=AVX2)
    for rows in (1, 2, 3, 5, 8, TALL_FROM - 1, TALL_FROM, TALL_FROM + 5):
        run_against_torch(lib, rows, 96, 97)


@pytest.mark.parametrize("target,panel", [(AVX2, 16), (AVX512, 32)], ids=["avx2", "avx512"])
def test_structure_gemv_groups_of_panels_in_parallel(target, panel):
    """Groups of GEMV_PANELS panels in parallel outermost, then the rows, the whole of K, and the group's
    panels unrolled, each panel's columns vectorised: one row by the group's columns of accumulators,
    compacted to a global-scope (stack, registers) array."""
    m = tirx.Var("m", "int64")
    group = GEMV_PANELS * panel
    sch = _gemv(Schedule(packed_dense(m, 2 * group, 64, panel)), target)
    main = sch.get_sblock(f"{ACCUMULATE}_update")
    loops = [sch.get(loop) for loop in sch.get_loops(main)]
    kind = tirx.ForKind
    assert loops[0].kind == kind.PARALLEL and int(loops[0].extent) == 2
    assert loops[1].extent.same_as(m)
    assert int(loops[-3].extent) == 64
    assert loops[-2].kind == kind.UNROLLED and int(loops[-2].extent) == GEMV_PANELS
    assert loops[-1].kind == kind.VECTORIZED and int(loops[-1].extent) == panel
    passes = tvm.s_tir.transform
    lowered = passes.PlanAndUpdateBufferAllocationLocation()(passes.LowerInitBlock()(sch.mod))
    compacted = passes.CompactBufferAllocation()(passes.ConvertBlocksToOpaque()(lowered))
    assert f'alloc_buffer((T.int64(1), {group}))' in compacted.script()


@pytest.mark.parametrize("target,panel", [(AVX2, 16), (AVX512, 32)], ids=["avx2", "avx512"])
def test_structure_register_tiles_of_panels_in_parallel(target, panel):
    """Panels in parallel outermost, then row tiles, k, and a ROWS x panel tile of accumulators compacted
    to the tile (a global-scope stack array LLVM keeps in registers): rows unrolled, the panel's columns
    vectorised; the epilogue stores the tile. (The nest alone, as tuning gets it: compile's function also
    has the GEMV nest, for one row.)"""
    m = tirx.Var("m", "int64")
    sch = DensePacked().apply(packed_dense(m, 512, 64, panel), target, True)
    assert sch is not None
    main = sch.get_sblock(f"{ACCUMULATE}_update")
    loops = [sch.get(loop) for loop in sch.get_loops(main)]
    kind = tirx.ForKind
    assert loops[0].kind == kind.PARALLEL and int(loops[0].extent) == 512 // panel
    assert loops[-2].kind == kind.UNROLLED and int(loops[-2].extent) == ROWS
    assert loops[-1].kind == kind.VECTORIZED and int(loops[-1].extent) == panel
    assert int(loops[-3].extent) == 64  # the whole of K runs inside the tile
    passes = tvm.s_tir.transform
    lowered = passes.PlanAndUpdateBufferAllocationLocation()(passes.LowerInitBlock()(sch.mod))
    compacted = passes.CompactBufferAllocation()(passes.ConvertBlocksToOpaque()(lowered))
    assert f'alloc_buffer((T.int64({ROWS}), {panel}))' in compacted.script()  # global: a stack array


@pytest.mark.parametrize("target,panel", [(AVX2, 16), (AVX512, 32)], ids=["avx2", "avx512"])
def test_structure_tall_register_tiles(target, panel):
    """The nest from TALL_FROM rows on: the same as ROWS rows' with TALL_ROWS x panel accumulators (12
    vectors on AVX2), compacted to the tile."""
    m = tirx.Var("m", "int64")
    sch = _tiles(packed_dense(m, 512, 64, panel), target, TALL_ROWS)
    main = sch.get_sblock(f"{ACCUMULATE}_update")
    loops = [sch.get(loop) for loop in sch.get_loops(main)]
    kind = tirx.ForKind
    assert loops[0].kind == kind.PARALLEL and int(loops[0].extent) == 512 // panel
    assert loops[-2].kind == kind.UNROLLED and int(loops[-2].extent) == TALL_ROWS
    assert loops[-1].kind == kind.VECTORIZED and int(loops[-1].extent) == panel
    assert int(loops[-3].extent) == 64
    passes = tvm.s_tir.transform
    lowered = passes.PlanAndUpdateBufferAllocationLocation()(passes.LowerInitBlock()(sch.mod))
    compacted = passes.CompactBufferAllocation()(passes.ConvertBlocksToOpaque()(lowered))
    assert f'alloc_buffer((T.int64({TALL_ROWS}), {panel}))' in compacted.script()


def test_other_functions_are_left_to_other_rules():
    x, w = te.placeholder((8, 16), name="x"), te.placeholder((4, 16), name="w")
    r = te.reduce_axis((0, 16), "r")
    y = te.compute((8, 4), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="NT_matmul")
    assert DensePacked().apply(te.create_prim_func([x, w, y]), AVX2, False) is None


@pytest.mark.parametrize("k,n", [(97, 130), (33, 16)])
def test_compiled_linear_at_any_batch_on_packed_weights(k, n):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(k, n), nn.GELU()).eval()
    compiled = sfx.compile(layer, torch.randn(8, k))
    panel = 2 * vector_lanes(compiled.target)
    shapes = [tuple(p.shape) for p in compiled.params]
    assert (-(-n // panel), k, panel) in shapes and (n, k) not in shapes  # stored packed, not repacked per call
    for batch in (1, 7, 33, 70):  # the GEMV nest, tiles of ROWS rows, of TALL_ROWS rows
        x = torch.randn(batch, k)
        with torch.no_grad():
            want = layer(x)
        assert float((compiled(x) - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_compiled_linear_on_flattened_rows(batch):
    """A (batch, 10, K) input reaches the layer as batch * 10 rows, a compound symbolic extent: the layer
    runs on packed weights too (the rows bound to a plain var after lifting), its bias and GELU fused."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(48, 40), nn.GELU()).eval()
    compiled = sfx.compile(layer, torch.randn(4, 10, 48))
    panel = 2 * vector_lanes(compiled.target)
    assert (-(-40 // panel), 48, panel) in [tuple(p.shape) for p in compiled.params]
    x = torch.randn(batch, 10, 48)
    with torch.no_grad():
        want = layer(x)
    assert float((compiled(x) - want).norm() / want.norm()) < 1e-5


def _only_packed(compiled, n: int, k: int) -> bool:
    """The (n, k) dense weight is among the build's parameters as packed panels only, in neither layout."""
    panel = 2 * vector_lanes(compiled.target)
    shapes = [tuple(p.shape) for p in compiled.params]
    return (-(-n // panel), k, panel) in shapes and (n, k) not in shapes and (k, n) not in shapes


class TransposedInput(nn.Module):
    """A linear layer on a non-contiguous (batch, seq, K) input, as attention's output projection reads
    its heads' merged context: torch.export spells it as expand + bmm, a 3-D matmul in Relax."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 19)

    def forward(self, x):
        return self.proj(x.transpose(0, 1)) + 1.0


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_linear_on_a_3d_input_runs_on_packed_weights(batch):
    torch.manual_seed(0)
    model = TransposedInput().eval()
    compiled = sfx.compile(model, torch.randn(7, 2, 24))
    assert _only_packed(compiled, 19, 24)
    x = torch.randn(batch, 2, 24)
    with torch.no_grad():
        want = model(x)
    assert float((compiled(x) - want).norm() / want.norm()) < 1e-5


class GatedBlock(nn.Module):
    """Token embeddings, a gated MLP (SiLU(gate(x)) * up(x), then down) and a residual: layers on
    batch * sequence rows, both symbolic (a ``config``, as transformers models have, makes compile keep
    the token ids' sequence symbolic), whose outputs combine."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(max_position_embeddings=32)
        self.embed = nn.Embedding(50, 24)
        self.gate, self.up = nn.Linear(24, 37, bias=False), nn.Linear(24, 37, bias=False)
        self.down = nn.Linear(37, 24)

    def forward(self, ids):
        x = self.embed(ids)
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x)) + x


def test_compiled_layers_on_symbolic_batch_and_sequence():
    torch.manual_seed(0)
    block = GatedBlock().eval()
    compiled = sfx.compile(block, torch.randint(0, 50, (2, 9)))
    assert _only_packed(compiled, 24, 37)
    for batch, sequence in [(1, 9), (3, 5), (2, 13)]:
        ids = torch.randint(0, 50, (batch, sequence))
        with torch.no_grad():
            want = block(ids)
        assert float((compiled(ids) - want).norm() / want.norm()) < 1e-5


class KNWeight(nn.Module):
    """A dense layer whose weight is stored (K, N), as transformers' Conv1D (GPT-2) keeps it:
    ``addmm(b, x, w)``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 37) * 0.1)
        self.bias = nn.Parameter(torch.randn(37) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, 24), self.weight).view(*x.shape[:-1], 37)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_kn_weight_runs_on_packed_weights(batch):
    torch.manual_seed(0)
    model = KNWeight().eval()
    compiled = sfx.compile(model, torch.randn(2, 5, 24))
    assert _only_packed(compiled, 37, 24)
    x = torch.randn(batch, 5, 24)
    with torch.no_grad():
        want = model(x)
    assert float((compiled(x) - want).norm() / want.norm()) < 1e-5
