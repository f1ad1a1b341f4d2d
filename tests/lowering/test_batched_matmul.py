"""Batched matmuls as one kernel over their operands' layout chains (structfx/lowering/batched_matmul.py) and the
matmul rule on them: numerics against torch at odd and prime sequence lengths, batch 1 and symbolic dims; the
kernel's reads and loop nest under a named target."""

import re

import numpy as np
import pytest
import torch
from torch import nn
from tvm import s_tir

import structfx as sfx
from structfx.lowering.batched_matmul import _Plan, batched_matmul
from structfx.lowering.build import lower_to_relax
from structfx.lowering.compat import Target, te, tirx, tvm
from structfx.lowering.export import export_for_compile
from structfx.lowering.schedule_rules.matmul import Matmul
from structfx.lowering.schedules import legalize

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})


class Attention(nn.Module):
    """Multi-head self-attention spelled as transformers' models spell it."""

    def __init__(self, width=32, heads=2, mask=False) -> None:
        super().__init__()
        self.heads, self.mask = heads, mask
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        if self.mask:
            scores = q @ k.transpose(-1, -2) / 4.0 + torch.triu(torch.full((n, n), -1e4), 1)
            y = torch.softmax(scores, -1) @ v
        else:
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("mask", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("length", [1, 7, 13])
def test_attention_matches_torch_at_any_batch(mask, length):
    torch.manual_seed(0)
    model = Attention(mask=mask).eval()
    compiled = sfx.compile(model, torch.randn(3, length, 32))
    for batch in (1, 3, 5):
        x = torch.randn(batch, length, 32)
        with torch.no_grad():
            want = model(x)
        assert float((compiled(x) - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("dim", [7, 24, 40])
def test_causal_attention_with_odd_head_dims_matches_torch(dim):
    torch.manual_seed(0)
    model = Attention(width=2 * dim, mask=True).eval()
    compiled = sfx.compile(model, torch.randn(3, 13, 2 * dim))
    for batch in (1, 3):
        x = torch.randn(batch, 13, 2 * dim)
        with torch.no_grad():
            want = model(x)
        assert float((compiled(x) - want).norm() / want.norm()) < 1e-5


def _kernels(model, example):
    """The legalized, fused module of ``model`` (before scheduling)."""
    target = AVX2
    mod, _ = lower_to_relax(export_for_compile(model, (example,)), target)
    return legalize(mod, target)


def test_attention_reads_q_k_v_in_the_projection_layout():
    mod = _kernels(Attention().eval(), torch.randn(3, 13, 32))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert not any("transpose" in n for n in names)  # no per-call copy of Q, K^T, V or the result
    signatures = [re.sub(r"T\.int64\((\d+)\)", r"\1", func.script().split("T.func_attr")[0])
                  for gv, func in mod.functions_items() if "batched_matmul" in gv.name_hint]
    # Q and K (Q K^T), V and the result (P V) in the (batch, seq, heads, head_dim) layout; the output
    # projection on the (batch, seq, width) view of P V's result runs on packed weights (packing.py)
    assert len(signatures) == 2
    assert any(name.startswith("fused_dense_packed") or name.startswith("dense_packed") for name in names)
    assert sum(s.count("13, 2, 16)") == 2 for s in signatures) == 2, signatures


def test_x_times_its_transpose_stays_one_kernel():
    class Gram(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    x = torch.randn(4, 6, 16)
    mod = _kernels(Gram(), x)
    kernels = [f for gv, f in mod.functions_items() if "batched_matmul" in gv.name_hint]
    assert len(kernels) == 1 and kernels[0].script().split("T.func_attr")[0].count("T.Buffer") == 2  # x, out
    compiled = sfx.compile(Gram(), x)
    y = torch.randn(2, 6, 16)
    assert torch.allclose(compiled(y), y @ y.transpose(-1, -2), atol=1e-5)


def _qk_func(b, s, heads=2, dim=16, tile=(4, 16)):
    """Q K^T over (b, s, heads, dim) operands as the rewrite plans it: out (b, heads, s, s), scaled, K read
    through its transposed panel."""
    q, k = te.placeholder((b, s, heads, dim), name="q"), te.placeholder((b, s, heads, dim), name="k")
    plan = _Plan(
        a=None, b=None, a_shape=[b, s, heads, dim], b_shape=[b, s, heads, dim], shape=[b, heads, s, s], rows=2,
        columns=3, k_extent=dim, scale=0.25, tile=tile,
        a_index=lambda d, r: [d[0], d[2], d[1], r], b_index=lambda d, r: [d[0], d[3], d[1], r], panel=True,
    )
    return te.create_prim_func([q, k, batched_matmul(q, k, plan=plan)])


@pytest.mark.parametrize("dim", [16, 7, 40])
def test_qk_kernel_with_symbolic_batch_and_length_matches_numpy(dim):
    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    func = _qk_func(b, s, dim=dim, tile=Matmul.tile(False, 8, s, s))
    lib = tvm.compile(Matmul().apply(func, AVX2, False).mod, target=AVX2)
    for batch, length in ((1, 1), (2, 7), (3, 13), (1, 33)):
        q, k = (np.random.randn(batch, length, 2, dim).astype("float32") for _ in range(2))
        out = tvm.runtime.tensor(np.zeros((batch, 2, length, length), "float32"))
        lib["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), out)
        want = np.einsum("bihd,bjhd->bhij", q, k) * 0.25
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_qk_structure_one_parallel_region_outer_products_over_keys_from_a_panel_of_k():
    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    sch = Matmul().apply(_qk_func(b, s, tile=Matmul.tile(False, 8, s, s)), AVX2, False)
    script = sch.mod.script()
    assert len(re.findall(r"T\.parallel\(", script)) == 1  # batch, heads and column tiles fused
    assert len(re.findall(r"T\.vectorized\((T\.int64\()?16\)", script)) == 3  # init, update, store: 16 keys
    assert "_pad" not in script  # no padded copy of an operand: the tail rows and keys are clamped reads
    lowered = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
    ])(sch.mod).script()
    lowered = re.sub(r"T\.int64\((\d+)\)", r"\1", lowered)
    # per parallel iteration, K^T's panel for 16 keys (head_dim 16 x 16), made once, then for each tile of
    # 4 query rows the accumulators: 4 rows x 16 keys, compacted to the tile
    parallel, panel, rows, tile = (lowered.index(text) for text in (
        "T.parallel(", "batched_matmul_panel = T.sblock_alloc_buffer((1, 1, 16, 16))", "in range((s + 3) // 4)",
        "batched_matmul_accumulate = T.sblock_alloc_buffer((1, 1, 4, 16))"))
    assert parallel < panel < rows < tile
