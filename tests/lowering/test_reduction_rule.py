"""The CPU rule for row reductions (structfx/lowering/schedule_rules/reduction.py): softmax, layer norm, RMS norm
and mean against torch at odd and prime row lengths, batch 1 and symbolic sizes; the loop nest it promises under
named targets; the functions it leaves to other rules."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, topi, tvm
from structfx.lowering.parallel_grain import BUILD_CONFIG, apply_parallel_grain
from structfx.lowering.schedule_rules.reduction import RowReduction

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})
AVX512 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


class RMSNorm(nn.Module):
    """T5's layer norm (MT5 and Llama normalise the same way): no mean subtracted, no bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class Mean(nn.Module):
    def forward(self, x):
        return x.mean(-1) + 1.0


class MaskedScores(nn.Module):
    """Attention's softmax over scores plus a mask of -inf on the last keys of each row, as BERT masks padding."""

    def forward(self, x):
        keys = x.shape[-1]
        mask = torch.zeros(keys, device=x.device)
        mask[keys // 2:] = float("-inf")
        return torch.softmax(x + mask, dim=-1)


def _layer_norm(width: int) -> nn.Module:
    norm = nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width) + 0.5)
        norm.bias.copy_(torch.randn(width))
    return norm


CASES = {
    "layer_norm_128": (lambda: _layer_norm(128), 128),
    "layer_norm_prime_37": (lambda: _layer_norm(37), 37),
    "layer_norm_shorter_than_two_vectors": (lambda: _layer_norm(11), 11),
    "rms_norm_64": (lambda: RMSNorm(64), 64),
    "rms_norm_prime_29": (lambda: RMSNorm(29), 29),
    "softmax_prime_31": (Softmax, 31),
    "softmax_8": (Softmax, 8),
    "mean_prime_67": (Mean, 67),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_row_reductions_match_torch_at_any_batch(name):
    """Compiled at batch 3 (symbolic batch), run at batch 1 and 5; values of mean 3 and spread 4, so a
    cancellation in the variance would show."""
    make, width = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    compiled = sfx.compile(model, torch.randn(3, 7, width))
    for batch in (1, 5):
        x = torch.randn(batch, 7, width) * 4 + 3
        with torch.no_grad():
            want = copy.deepcopy(model).double()(x.double())
        got = compiled(x)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5, (name, batch)


def test_masked_softmax_is_exact_zero_where_masked_at_any_batch():
    """Nine keys: one vector and a remainder; the masked keys fall in both."""
    model = MaskedScores().eval()
    compiled = sfx.compile(model, torch.randn(3, 2, 9, 9))
    for batch in (1, 4):
        x = torch.randn(batch, 2, 9, 9) * 5
        got = compiled(x)
        assert (got[..., 4:] == 0).all(), batch
        assert torch.allclose(got, model(x), atol=1e-6), batch


def _softmax(length):
    rows = tirx.Var("n", "int64")
    x = te.placeholder((rows, length), "float32", "x")
    return rows, te.create_prim_func([x, topi.nn.softmax(x)])


def _build(func, target):
    sch = RowReduction().apply(func, target, False)
    assert sch is not None
    mod = apply_parallel_grain(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target)
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        return tvm.compile(mod, target=target)


@pytest.mark.parametrize("rows,length", [(1, 37), (5, 37), (3, 16), (2, 7), (4, "symbolic")])
def test_rule_matches_numpy_at_odd_lengths_and_one_row(rows, length):
    _, func = _softmax(tirx.Var("length", "int64") if length == "symbolic" else length)
    lib = _build(func, AVX2)
    for width in (29, 8, 1) if length == "symbolic" else (length,):
        x = np.random.default_rng(rows).standard_normal((rows, width)).astype("float32") * 4
        x[:, 1::3] = -np.inf  # masked keys, in the vectors and in the remainder
        out = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), out)
        want = np.exp(x - x.max(-1, keepdims=True))
        np.testing.assert_allclose(out.numpy(), want / want.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
        assert (out.numpy()[:, 1::3] == 0).all()


def _loops(sch, name):
    return [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name))]


@pytest.mark.parametrize("target,lanes", [(AVX2, 8), (AVX512, 16)], ids=["avx2", "avx512"])
def test_structure_parallel_rows_vector_partials_and_vector_output(target, lanes):
    """Every block runs under one parallel loop over the (symbolic) rows; each reduction accumulates ``lanes``
    partials in one vector over the row and sums them after; the output is written a vector at a time. A
    static length that is no multiple of the lanes has its last vector partitioned off, with the predicate."""
    rows, func = _softmax(37)
    sch = RowReduction().apply(func, target, False)
    kind = tirx.ForKind
    whole = 37 // lanes
    for name in ("T_softmax_maxelem_rf", "T_softmax_expsum_rf"):
        vectors, lane = _loops(sch, f"{name}_update_ax1_00")  # inside the partition's block, under the rows
        assert int(vectors.extent) == whole and lane.kind == kind.VECTORIZED and int(lane.extent) == lanes
        assert _loops(sch, f"{name}_update_ax1_01")[-1].extent == lanes  # the last vector, predicated
        assert _loops(sch, f"{name}_init")[-1].kind == kind.VECTORIZED
    for name in ("T_softmax_maxelem", "T_softmax_expsum"):
        row, lane = _loops(sch, name)
        assert row.kind == kind.PARALLEL and row.extent.same_as(rows) and int(lane.extent) == lanes
    vectors, lane = _loops(sch, "T_softmax_norm_ax1_00")
    assert int(vectors.extent) == whole and lane.kind == kind.VECTORIZED
    blocks = [sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_loops(
        sch.get_sblock("T_softmax_maxelem"))[0])]
    # every block under the rows; the exponential, read by the sum and by the output, computed once per row
    assert blocks == ["T_softmax_maxelem_rf_init", "T_softmax_maxelem_rf_update_ax1_0_common", "T_softmax_maxelem",
                      "T_softmax_exp_ax1_0_common", "T_softmax_expsum_rf_init",
                      "T_softmax_expsum_rf_update_ax1_0_common", "T_softmax_expsum", "T_softmax_norm_ax1_0_common"]
    vectors, lane = _loops(sch, "T_softmax_exp_ax1_00")
    assert int(vectors.extent) == whole and lane.kind == kind.VECTORIZED
    assert "T.exp(" not in sch.get(sch.get_sblock("T_softmax_expsum_rf_update_ax1_00")).body.script()


def test_structure_symbolic_length_leaves_the_last_vector_to_lowering():
    """A symbolic row length: the predicate of the loop of vectors is hinted ``likely``, which TIR's loop
    partitioning (lowering) peels off."""
    _, func = _softmax(tirx.Var("keys", "int64"))
    sch = RowReduction().apply(func, AVX2, False)
    _, vectors, lane = _loops(sch, "T_softmax_expsum_rf_update")
    assert lane.kind == tirx.ForKind.VECTORIZED and int(lane.extent) == 8
    assert sch.mod["main"].script().count("T.likely(") == 4  # max and sum partials, exp, output


def test_structure_layer_norm_of_whole_vectors_has_no_predicate():
    rows = tirx.Var("n", "int64")
    x = te.placeholder((rows, 128), "float32", "x")
    gamma, beta = te.placeholder((128,), "float32", "gamma"), te.placeholder((128,), "float32", "beta")
    func = te.create_prim_func([x, gamma, beta, topi.nn.layer_norm(x, gamma, beta, axis=[1], epsilon=1e-5)])
    sch = RowReduction().apply(func, AVX2, False)
    for name in ("x_sum_rf_update", "x_var_sum_rf_update", "T_layer_norm"):
        row, vectors, lane = _loops(sch, name)
        assert row.kind == tirx.ForKind.PARALLEL and int(vectors.extent) == 16 and lane.kind == tirx.ForKind.VECTORIZED
    _, = _loops(sch, "x_mean")  # once per row
    assert "T.where" not in sch.mod["main"].script()


def test_other_functions_are_left_to_other_rules():
    rows = tirx.Var("n", "int64")
    x = te.placeholder((rows, 37), "float32", "x")
    columns = te.create_prim_func([x, topi.sum(x, axis=0)])  # a reduction over the rows, not along them
    whole = te.create_prim_func([x, topi.sum(x)])  # to one value
    elementwise = te.create_prim_func([x, topi.exp(x)])
    for func in (columns, whole, elementwise):
        assert RowReduction().apply(func, AVX2, False) is None
