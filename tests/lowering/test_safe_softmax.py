"""Attention's guarded softmax as one kernel (structfx/lowering/safe_softmax.py): the graph rewrite on the
Relax module torch's scaled_dot_product_attention imports to, the kernel's loop nest under a named target,
and values against torch with fully masked rows, odd key counts, batch 1 and a symbolic batch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.lowering.build import lower_to_relax
from structfx.lowering.compat import Target, relax, te, tirx, tvm
from structfx.lowering.export import export_for_compile
from structfx.lowering.graph_fixes import prepare_for_import
from structfx.lowering.parallel_grain import BUILD_CONFIG, apply_parallel_grain
from structfx.lowering.safe_softmax import fuse_safe_softmax, safe_softmax
from structfx.lowering.schedule_rules.reduction import RowReduction

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"], "num-cores": 2})


class Attention(nn.Module):
    """SDPA over (batch, heads, queries, keys) with a boolean mask whose last query row masks every key:
    torch gives zeros there (``_safe_softmax``) where a plain softmax gives NaN."""

    def __init__(self, keys: int) -> None:
        super().__init__()
        mask = torch.rand(keys, keys, generator=torch.Generator().manual_seed(keys)) > 0.3
        mask[:, 0] = True
        mask[-1] = False
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _inputs(batch: int, keys: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, keys, 16, generator=g) for _ in range(3))


def _ops(mod) -> list[str]:
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                names.append(value.op.name)
    return names


def test_guard_and_softmax_become_one_kernel():
    model = Attention(9).eval()
    program = prepare_for_import(export_for_compile(model, _inputs(3, 9)))
    mod, _ = lower_to_relax(program, AVX2)
    before = _ops(mod)
    assert "relax.nn.softmax" in before and "relax.max" in before and "relax.where" in before
    with AVX2:
        after = fuse_safe_softmax(mod)
    ops = _ops(after)
    assert not {"relax.nn.softmax", "relax.max", "relax.equal", "relax.logical_not"} & set(ops)
    assert ops.count("relax.where") == before.count("relax.where") - 1  # the mask's where(mask, 0, -inf) stays
    assert ops.count("relax.call_tir") == 1
    assert "safe_softmax" in [gv.name_hint for gv in after.get_global_vars()]


def test_other_softmax_forms_are_left_as_they_are():
    """A softmax without the guard, and one over another axis than the last, stay TVM's softmax."""

    class Plain(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1) + torch.softmax(x, 1)

    program = prepare_for_import(export_for_compile(Plain().eval(), (torch.randn(3, 5, 7),)))
    mod, _ = lower_to_relax(program, AVX2)
    with AVX2:
        assert _ops(fuse_safe_softmax(mod)).count("relax.nn.softmax") == 2


@pytest.mark.parametrize("keys", [9, 13, 16])
def test_compiled_attention_matches_torch_with_masked_rows_at_any_batch(keys):
    model = Attention(keys).eval()
    compiled = sfx.compile(model, _inputs(3, keys))
    for batch in (1, 5):
        inputs = _inputs(batch, keys, seed=batch)
        with torch.no_grad():
            want = model(*inputs)
        got = compiled(*inputs)
        assert (got[:, :, -1] == 0).all(), (keys, batch)
        assert float((got - want).abs().max()) < 1e-5, (keys, batch)


def _scheduled(length):
    rows = tirx.Var("n", "int64")
    x = te.placeholder((rows, 3, length), "float32", "x")
    return RowReduction().apply(te.create_prim_func([x, safe_softmax(x)]), AVX2, False)


def test_structure_one_row_loop_and_exp_once_per_row():
    """Every block under one parallel loop over the (symbolic) rows; the exponential is its own vectorised
    block, read by the sum and by the output, not recomputed in them."""
    sch = _scheduled(37)
    row = sch.get_loops(sch.get_sblock("T_softmax_maxelem"))[0]
    assert sch.get(row).kind == tirx.ForKind.PARALLEL
    blocks = [sch.get(block).name_hint for block in sch.get_child_blocks(row)]
    assert "T_fast_exp_ax2_0_common" in blocks and blocks[-1] == "T_safe_softmax_ax2_0_common"
    lane = sch.get_loops(sch.get_sblock("T_fast_exp_ax2_00"))[-1]
    assert sch.get(lane).kind == tirx.ForKind.VECTORIZED and int(sch.get(lane).extent) == 8
    for name in ("T_softmax_expsum_rf_update_ax2_00", "T_safe_softmax_ax2_00"):
        body = sch.get(sch.get_sblock(name)).body.script()
        assert "T_fast_exp[" in body and "exp(" not in body.replace("T_fast_exp[", "")


@pytest.mark.parametrize("length", [37, 8, "symbolic"])
def test_kernel_matches_numpy_with_masked_rows(length):
    sch = _scheduled(tirx.Var("keys", "int64") if length == "symbolic" else length)
    mod = apply_parallel_grain(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), AVX2)
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        lib = tvm.compile(mod, target=AVX2)
    for width in (29, 8, 1) if length == "symbolic" else (length,):
        x = np.random.default_rng(width).standard_normal((5, 3, width)).astype("float32") * 4
        x[:, 1, ::2] = -np.inf  # some keys masked
        x[:, 2] = -np.inf  # every key masked: zeros, as torch's _safe_softmax
        x[0, 0] = np.finfo(np.float32).min  # a finfo.min mask (Hugging Face's eager attention): uniform
        x[1, 0, -1] = np.nan  # NaN propagates
        out = tvm.runtime.tensor(np.full_like(x, 7.0))
        lib["main"](tvm.runtime.tensor(x), out)
        want = torch.ops.aten._safe_softmax(torch.from_numpy(x), -1).numpy()
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-7)
        assert (out.numpy()[:, 2] == 0).all()
