"""The CPU schedule rules for TVM's own ops (structfx/lowering/schedule_rules): numerics against torch at odd and prime
sizes, batch 1 and symbolic dims, and the loop nests each rule promises under named targets."""

import re

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, topi, tvm
from structfx.lowering.schedule_rules.conv import Conv
from structfx.lowering.schedule_rules.matmul import Matmul
from structfx.lowering.schedules import GenericCPU
from structfx.lowering.target import host_target

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})
AVX512 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


def nt_dense(m, n, k, epilogue=True):
    """y = relu(x @ w.T + bias): a Linear layer as FuseTransposeMatmul + FuseOps leave it."""
    x, w, bias = te.placeholder((m, k), name="x"), te.placeholder((n, k), name="w"), te.placeholder((n,), name="b")
    r = te.reduce_axis((0, k), "r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="NT_matmul")
    if not epilogue:
        return te.create_prim_func([x, w, y])
    biased = te.compute((m, n), lambda i, j: y[i, j] + bias[j], name="T_add")
    out = te.compute((m, n), lambda i, j: te.max(biased[i, j], tirx.const(0.0, "float32")), name="relu")
    return te.create_prim_func([x, w, bias, out])


def nn_batched(b, m, n, k):
    """Batched a @ b with B stored (batch, K, N), as attention's probabilities times V."""
    a, bm = te.placeholder((b, m, k), name="a"), te.placeholder((b, k, n), name="bm")
    r = te.reduce_axis((0, k), "r")
    out = te.compute((b, m, n), lambda h, i, j: te.sum(a[h, i, r] * bm[h, r, j], axis=r), name="matmul")
    return te.create_prim_func([a, bm, out])


def nt_batched_through_panel(b, m, n, k):
    """Batched a @ bt.T with bt stored (batch, N, K), read through a (batch, K, N) copy made in the
    function (batched_matmul's panel of K^T for Q K^T)."""
    a, bt = te.placeholder((b, m, k), name="a"), te.placeholder((b, n, k), name="bt")
    panel = te.compute((b, k, n), lambda h, r, j: bt[h, j, r], name="panel")
    r = te.reduce_axis((0, k), "r")
    out = te.compute((b, m, n), lambda h, i, j: te.sum(a[h, i, r] * panel[h, r, j], axis=r), name="matmul")
    return te.create_prim_func([a, bt, out])


def _run(func, arrays, out_shape, target=None):
    target = target or host_target()
    sch = Matmul().apply(func, target, False)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)]
    lib["main"](*args)
    return torch.from_numpy(args[-1].numpy())


def _close(got, want):
    assert float((got - want).norm() / want.norm().clamp_min(1e-12)) < 1e-5


@pytest.mark.parametrize("m,n,k", [(1, 17, 13), (7, 31, 29), (12, 64, 48), (5, 3, 2), (33, 257, 263)])
def test_dense_with_epilogue_matches_torch_at_odd_and_prime_sizes(m, n, k):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    got = _run(nt_dense(m, n, k), [x.numpy(), w.numpy(), b.numpy()], (m, n))
    _close(got, torch.relu(x @ w.T + b))


def test_dense_with_a_symbolic_batch_serves_any_rows():
    rows = tirx.Var("rows", "int64")
    func = nt_dense(rows, 40, 24)
    target = host_target()
    lib = tvm.compile(Matmul().apply(func, target, False).mod, target=target)
    w, b = torch.randn(40, 24), torch.randn(40)
    for m in (1, 2, 5, 37):
        x = torch.randn(m, 24)
        args = [tvm.runtime.tensor(a.numpy()) for a in (x, w, b)] + [tvm.runtime.tensor(np.zeros((m, 40), "float32"))]
        lib["main"](*args)
        _close(torch.from_numpy(args[-1].numpy()), torch.relu(x @ w.T + b))


def test_dense_without_epilogue():
    x, w = torch.randn(9, 16), torch.randn(24, 16)
    _close(_run(nt_dense(9, 24, 16, epilogue=False), [x.numpy(), w.numpy()], (9, 24)), x @ w.T)


@pytest.mark.parametrize("b,m,n,k", [(1, 1, 16, 8), (3, 7, 13, 11), (2, 16, 64, 32), (4, 5, 24, 3)])
def test_batched_matmul_matches_torch(b, m, n, k):
    a, bm = torch.randn(b, m, k), torch.randn(b, k, n)
    _close(_run(nn_batched(b, m, n, k), [a.numpy(), bm.numpy()], (b, m, n)), a @ bm)


@pytest.mark.parametrize("b,m,n,k", [(1, 1, 16, 8), (3, 7, 32, 11), (2, 13, 48, 40)])
def test_batched_matmul_through_a_panel_of_b_matches_torch(b, m, n, k):
    a, bt = torch.randn(b, m, k), torch.randn(b, n, k)
    _close(_run(nt_batched_through_panel(b, m, n, k), [a.numpy(), bt.numpy()], (b, m, n)), a @ bt.transpose(1, 2))


def test_batched_matmul_with_symbolic_batch_and_rows():
    heads, rows = tirx.Var("heads", "int64"), tirx.Var("rows", "int64")
    func = nn_batched(heads, rows, 32, 16)
    target = host_target()
    lib = tvm.compile(Matmul().apply(func, target, False).mod, target=target)
    for h, m in ((1, 1), (3, 7)):
        a, bm = torch.randn(h, m, 16), torch.randn(h, 16, 32)
        args = [tvm.runtime.tensor(t.numpy()) for t in (a, bm)] + [tvm.runtime.tensor(np.zeros((h, m, 32), "float32"))]
        lib["main"](*args)
        _close(torch.from_numpy(args[-1].numpy()), a @ bm)


def _loops(sch) -> list[tuple[str, int | None]]:
    """(kind, static extent or None) of every loop of the scheduled function, read from its TVMScript."""
    found = re.findall(r"T\.(parallel|vectorized|unroll|serial)\(([^:]*?)\):", sch.mod.script())
    return [(kind, int(m.group(1)) if (m := re.fullmatch(r"(?:T\.int64\()?(\d+)\)?", extent)) else None)
            for kind, extent in found]


@pytest.mark.parametrize("target,lanes", [(AVX2, 8), (AVX512, 16)], ids=["avx2", "avx512"])
def test_dense_structure_dot_products_over_k_in_parallel_tiles(target, lanes):
    loops = _loops(Matmul().apply(nt_dense(tirx.Var("m", "int64"), 256, 512), target, False))
    kinds = [kind for kind, _ in loops]
    assert ("vectorized", lanes) in loops  # the k lanes of every accumulator
    assert kinds.count("unroll") >= 2  # the register tile: rows and columns
    assert "parallel" in kinds


@pytest.mark.parametrize("target,lanes", [(AVX2, 8), (AVX512, 16)], ids=["avx2", "avx512"])
def test_batched_structure_outer_products_over_n(target, lanes):
    loops = _loops(Matmul().apply(nn_batched(12, 128, 64, 64), target, False))
    assert any(kind == "vectorized" and extent % lanes == 0 for kind, extent in loops)
    assert "parallel" in [kind for kind, _ in loops]


def test_batched_structure_panel_of_b_made_once_per_column_tile():
    # parallel over (batch, column tiles); each makes its K x 16 panel of B, then runs every row tile on it
    script = Matmul().apply(nt_batched_through_panel(12, 128, 64, 32), AVX2, False).mod.script()
    parallel, panel, rows = (script.index(text) for text in ("T.parallel(", 'T.sblock("panel")', "in range(32)"))
    assert parallel < panel < rows and script.count("T.parallel(") == 1
    assert re.search(r"T\.parallel\((T\.int64\()?48\)", script)  # 12 batches x 4 column tiles of 16


def test_not_a_matmul_is_left_to_other_rules():
    x = te.placeholder((8, 8), name="x")
    r = te.reduce_axis((0, 8), "r")
    total = te.compute((8,), lambda i: te.sum(x[i, r], axis=r), name="sum")
    assert Matmul().apply(te.create_prim_func([x, total]), AVX2, False) is None


CONVS = [
    nn.Conv2d(8, 16, 3, padding=1),
    nn.Conv2d(5, 7, 3, stride=2, padding=1),
    nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
    nn.Conv2d(12, 8, 1, groups=4),
    nn.Conv1d(6, 10, 5, stride=3),
]


@pytest.mark.parametrize("conv", CONVS, ids=["3x3", "odd_stride2", "depthwise", "grouped_1x1", "conv1d"])
@pytest.mark.parametrize("batch", [1, 3])
def test_convolutions_with_epilogue_match_torch(conv, batch):
    model = nn.Sequential(conv, nn.ReLU()).eval()
    size = (37,) if isinstance(conv, nn.Conv1d) else (13, 11)
    x = torch.randn(batch, conv.in_channels, *size)
    compiled = sfx.compile(model, x)
    with torch.no_grad():
        _close(compiled(x), model(x))


def test_conv_structure_vectorised_along_the_output_row():
    x = te.placeholder((2, 16, 34, 34), name="x")
    w = te.placeholder((32, 16, 3, 3), name="w")
    out = topi.nn.conv2d_nchw(x, w, stride=1, padding=0, dilation=1)
    sch = Conv().apply(te.create_prim_func([x, w, out]), AVX2, False)
    loops = _loops(sch)
    assert ("vectorized", 16) in loops  # a tile of 16 output columns: two AVX2 vectors
    assert "parallel" in [kind for kind, _ in loops]
    assert any(kind == "unroll" for kind, _ in loops)  # the output channels of the register tile


class Norms(nn.Module):
    """Softmax, layer norm, RMS norm, mean and GELU: the reductions and elementwise ops of a model."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        return torch.softmax(self.norm(x), dim=-1) + nn.functional.gelu(rms) + x.mean(-1, keepdim=True)


@pytest.mark.parametrize("width", [37, 64])
def test_reductions_and_elementwise_match_torch_at_any_batch(width):
    model = Norms(width).eval()
    compiled = sfx.compile(model, torch.randn(3, 5, width))
    for batch in (1, 7):
        x = torch.randn(batch, 5, width)
        with torch.no_grad():
            _close(compiled(x), model(x))


def test_elementwise_structure_parallel_outside_vectorised_inside():
    x = te.placeholder((tirx.Var("rows", "int64"), 96), name="x")
    y = te.compute(x.shape, lambda i, j: te.max(x[i, j] * 2.0, tirx.const(0.0, "float32")), name="relu")
    loops = _loops(GenericCPU().apply(te.create_prim_func([x, y]), AVX2, False))
    assert ("vectorized", 8) in loops and "parallel" in [kind for kind, _ in loops]


def _masked_add(b, s):
    """Attention's score add: (b, 2, s, s) + a mask (b, 1, s, s) broadcast over the heads."""
    x, m = te.placeholder((b, 2, s, s), name="x"), te.placeholder((b, 1, s, s), name="m")
    out = te.compute(x.shape, lambda i, h, q, k: x[i, h, q, k] + m[i, 0, q, k], name="masked")
    return te.create_prim_func([x, m, out])


def test_elementwise_with_symbolic_innermost_extent_keeps_it_a_serial_inner_loop():
    """Fused into the parallel loop, every element would take its indices apart by divisions by s."""
    s = tirx.Var("s", "int64")
    sch = GenericCPU().apply(_masked_add(tirx.Var("b", "int64"), s), AVX2, False)
    loops = sch.get_loops(sch.get_sblock("masked"))
    assert len(loops) == 2
    assert sch.get(loops[0]).kind == tirx.ForKind.PARALLEL
    assert sch.get(loops[1]).kind == tirx.ForKind.SERIAL and sch.get(loops[1]).extent.same_as(s)


@pytest.mark.parametrize("b,s", [(1, 1), (3, 7), (2, 33)])
def test_elementwise_with_symbolic_extents_matches_numpy(b, s):
    func = _masked_add(tirx.Var("b", "int64"), tirx.Var("s", "int64"))
    target = host_target()
    lib = tvm.compile(GenericCPU().apply(func, target, False).mod, target=target)
    x, m = np.random.rand(b, 2, s, s).astype("float32"), np.random.rand(b, 1, s, s).astype("float32")
    args = [tvm.runtime.tensor(a) for a in (x, m, np.zeros_like(x))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), x + m, rtol=1e-6)
