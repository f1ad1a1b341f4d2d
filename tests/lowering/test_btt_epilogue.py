"""The BTT kernel with the elementwise ops after it fused in (structfx/lowering/ops/btt.py, fusion.py): the bias
add, activation and residual add run in the kernel's row tiles, not as kernels of their own, under a named
target; numerics against torch at odd and prime sizes, batch 1 and a symbolic batch, on (B, n), (B, S, n), (B, 7, n)
and (B, 1, n) inputs (the last reshaped to rows, its epilogue left outside: padded to a row tile it would
compute four times its rows)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.lowering.build import legalize_module, lower_to_relax
from structfx.lowering.compat import Target, te, tirx
from structfx.lowering.export import example_arguments, export_for_compile
from structfx.lowering.ops.btt import BTTCPU, OUT, ROWS, STAGE1, STAGE2, btt_te
from structfx.lowering.ops.common import find_block
from structfx.nn import BTTLinear

ZEN3 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2})


class Block(nn.Module):
    """x + fc2(act(fc1(x))): a transformer MLP of BTT layers, the residual add after the second."""

    def __init__(self, n: int, hidden: int, act=F.gelu, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = BTTLinear(n, hidden, rank=4, bias=bias), BTTLinear(hidden, n, rank=4, bias=bias)
        if bias:
            nn.init.normal_(self.fc1.bias)
            nn.init.normal_(self.fc2.bias)
        self.act = act

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def _fused(model: nn.Module, example: torch.Tensor, target: Target) -> dict:
    """Name -> PrimFunc of the module's kernels after legalization and fusion, before scheduling."""
    program = export_for_compile(model.eval(), example_arguments(example, "test"))
    mod, _ = lower_to_relax(program, target)
    mod = legalize_module(mod, target)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.mark.parametrize("shape", [(2, 8, 40), (3, 40)], ids=["batch_seq_n", "batch_n"])
def test_activation_and_residual_add_join_the_btt_kernels(shape):
    """Under a named target the GELU is part of fc1's kernel and the residual add part of fc2's: no kernel of
    their own, and the rule schedules both fused kernels."""
    kernels = _fused(Block(40, 52), torch.randn(*shape), ZEN3)
    fused = sorted(name for name in kernels if name.startswith("fused_structfx_btt"))
    assert len(fused) == 2, sorted(kernels)
    assert any("gelu" in name for name in fused) and any("add" in name for name in fused)
    assert not [name for name in kernels if not name.startswith("fused_structfx") and ("gelu" in name or "add" in name)]
    for name in fused:
        assert BTTCPU().apply(kernels[name], ZEN3, False) is not None, name


def _epilogue_schedule(batch, seq):
    """relu(btt(x) + bias) + r on x (batch, seq, 128) as fusion leaves it, scheduled by the rule for ZEN3."""
    def dims(*extents):
        return [e if isinstance(e, tirx.Var) else tirx.IntImm("int64", e) for e in extents]

    x, r = te.placeholder(dims(batch, seq, 128), name="x"), te.placeholder(dims(batch, seq, 128), name="r")
    w1, w2 = te.placeholder(dims(8, 16, 4 * 16), name="w1"), te.placeholder(dims(16, 4 * 8, 8), name="w2")
    bias = te.placeholder(dims(128), name="bias")
    y = btt_te(x, w1, w2, bias)
    relu = te.compute(y.shape, lambda *i: te.max(y(*i), tirx.const(0.0, "float32")), name="relu")
    out = te.compute(y.shape, lambda *i: relu(*i) + r(*i), name="residual")
    sch = BTTCPU().apply(te.create_prim_func([x, w1, w2, bias, r, out]), ZEN3, False)
    assert sch is not None
    return sch


@pytest.mark.parametrize("seq", [4, tirx.Var("seq", "int64")], ids=["static_seq", "symbolic_seq"])
def test_epilogue_runs_in_the_row_tile(seq):
    """One parallel loop over (batch, tiles of ROWS rows of the sequence) holds both stages and the epilogue
    (inlined into one vectorised block that reads the tile's accumulators): nothing runs outside it, no kernel
    output is stored twice, and each stage computes one tile of rows."""
    sch = _epilogue_schedule(tirx.Var("batch", "int64"), seq)
    func = sch.mod["main"]
    assert find_block(sch, "relu") is None and find_block(sch, OUT) is None
    top = func.body.block.body
    assert isinstance(top, tirx.For) and top.kind == tirx.ForKind.PARALLEL
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("residual"))]
    assert loops[0].same_as(top)
    assert loops[-1].kind == tirx.ForKind.VECTORIZED
    for name in (STAGE1 + "_update", STAGE2 + "_update"):
        stage = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name))]
        assert stage[0].same_as(top)
        assert (stage[-2].kind, int(stage[-2].extent)) == (tirx.ForKind.UNROLLED, ROWS)


@pytest.mark.parametrize("n, hidden, shape, bias", [
    (40, 52, (8, 40), True),
    (40, 52, (5, 8, 40), True),
    (37, 53, (5, 4, 37), True),  # primes: inputs padded, outputs sliced
    (40, 52, (5, 7, 40), True),  # 7 rows padded to 8 in each tile
    (40, 52, (5, 1, 40), True),  # reshaped to rows, the epilogue outside
    (48, 64, (5, 4, 48), False),
], ids=["batch_n", "batch_seq_n", "primes", "seq_7", "seq_1", "no_bias"])
def test_matches_torch_at_any_batch(n, hidden, shape, bias):
    model = Block(n, hidden, bias=bias).eval()
    compiled = sfx.compile(model, torch.randn(*shape))
    for batch in (1, 3, 8):
        x = torch.randn(batch, *shape[1:])
        with torch.no_grad():
            assert _relative(compiled(x), model(x)) < 1e-5, batch


def test_relu_epilogue_matches_torch():
    model = Block(40, 52, act=F.relu).eval()
    compiled = sfx.compile(model, torch.randn(2, 4, 40))
    x = torch.randn(1, 4, 40)
    with torch.no_grad():
        assert _relative(compiled(x), model(x)) < 1e-5
    assert any(name.startswith("fused_structfx_btt") for name in compiled.kernels)
