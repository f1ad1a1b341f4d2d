"""The compiled channel max-plus kernel (structfx/lowering/ops/channel_maxplus.py): ChannelMaxPlus reads its
feature map where it lies, as one kernel (no transposed copies around it); numerics against eager at prime
channel counts and spatial sizes, batches 1, 3 and 6 of one symbolic-batch build, ReLU kept bit for bit in
either memory format, NaN and inf as eager; the CPU loop nest under a named target; save/load and tune."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.compat import Target, te, tirx, tvm
from structfx.lowering.nan_propagation import NAN_EXACT, propagate_nan
from structfx.lowering.ops.channel_maxplus import (
    KERNEL,
    ChannelMaxPlusCPU,
    channel_maxplus_te,
    spatial_run,
)
from structfx.lowering.tuning.database import RECORDS
from structfx.nn import ChannelMaxPlus
from structfx.runtime import load

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})
LANES = 8


def _paper(n_in: int, n_out: int, k: int, bias: bool = True) -> ChannelMaxPlus:
    return ChannelMaxPlus(n_in, n_out, k=k, bias=bias, init="paper", generator=torch.Generator().manual_seed(0)).eval()


@pytest.mark.parametrize(
    "n_in, n_out, k, bias, spatial",
    [(13, 7, 3, True, (7, 7)), (5, 11, 2, False, (3, 5)), (8, 8, 8, True, (16, 12)), (3, 17, 1, True, (11,)),
     (6, 5, 2, True, (2, 3, 5)), (9, 9, 2, True, (1, 1))],
    ids=["primes_7x7", "no_bias_3x5", "dense_whole_vectors", "conv1d_length_11_k1", "volume_2x3x5", "one_pixel"],
)
def test_matches_eager_at_any_batch(n_in, n_out, k, bias, spatial):
    layer = _paper(n_in, n_out, k, bias)
    compiled = sfx.compile(layer, torch.randn(2, n_in, *spatial))
    assert list(compiled.kernels) == ["structfx_channel_maxplus"]  # no transpose copy kernels around it
    for batch in (1, 3, 6):
        x = torch.randn(batch, n_in, *spatial)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-6, msg=f"batch {batch}")


class FeaturesAtDim2(nn.Module):
    """The op over dim 2 of (B, T, C, L): x viewed as (B * T, C, L) around the same kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = _paper(5, 3, 2)

    def forward(self, x):
        layer = self.layer
        return torch.ops.structfx.sparse_maxplus(x, layer.idx, layer.weight, layer.bias, 2)


def test_features_at_a_middle_dim_match_eager():
    module = FeaturesAtDim2().eval()
    compiled = sfx.compile(module, torch.randn(2, 4, 5, 7))
    for batch in (1, 3):
        x = torch.randn(batch, 4, 5, 7)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), module(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_relu_init_is_relu_bit_for_bit(memory_format):
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 5, 1)).eval().to(memory_format=memory_format)
    x = (torch.randn(3, 3, 9, 13) * 10).to(memory_format=memory_format)
    small = sfx.transform(model, [sfx.MaxPlus(k=2)], example_inputs=(x,))
    assert isinstance(small.get_submodule("1"), ChannelMaxPlus)
    with torch.no_grad():
        assert torch.equal(small(x), model(x))
        relu_compiled = sfx.compile(nn.Sequential(model[0], model[1]), x)(x)
    maxplus_compiled = sfx.compile(nn.Sequential(model[0], small.get_submodule("1")), x)(x)
    assert torch.equal(maxplus_compiled, relu_compiled)


def test_nan_and_inf_as_eager():
    layer = _paper(4, 6, 2)
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 0, 0], x[1, 2, 2, 1], x[1, 3, 0, 2] = float("nan"), float("inf"), float("-inf")
    compiled = sfx.compile(layer, x)
    with torch.no_grad():
        want = layer(x)
    assert want.isnan().any() and want.isinf().any()  # the cases reach the output
    torch.testing.assert_close(compiled(x), want, rtol=0, atol=0, equal_nan=True)


def test_export_has_no_transpose_around_the_op():
    layer = _paper(6, 6, 2)
    exported = torch.export.export(layer, (torch.randn(2, 6, 4, 5),))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == ["structfx.sparse_maxplus.default"]


def test_save_and_load_round_trip_is_bitwise(tmp_path):
    layer = _paper(7, 9, 3)
    x = torch.randn(3, 7, 5, 6)
    compiled = sfx.compile(layer, x)
    runtime = load(compiled.save(tmp_path / "channel.sfx"))
    assert np.array_equal(runtime(x.numpy()), compiled(x).numpy())


def test_tune_searches_the_spatial_run(tmp_path):
    layer = _paper(8, 8, 2)
    x = torch.randn(2, 8, 16, 16)
    sfx.tune(layer, x, trials=2, database=tmp_path / "db", progress=False)
    records = [json.loads(line) for line in (tmp_path / "db" / RECORDS).read_text().splitlines()]
    assert {r["kernel"] for r in records} == {"structfx_channel_maxplus"}
    compiled = sfx.compile(layer, x, database=tmp_path / "db")
    for batch in (1, 5):
        x = torch.randn(batch, 8, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("inner, run", [(3136, 64), (784, 56), (196, 49), (49, 49), (127 * 2, 2)])
def test_spatial_run_divides_the_axis(inner, run):
    assert spatial_run(inner, LANES) == run


def _cpu_schedule(*spatial):
    int64 = lambda v: tirx.IntImm("int64", v) if isinstance(v, int) else v  # noqa: E731
    batch = tirx.Var("n", "int64")
    x = te.placeholder([batch, int64(16), *map(int64, spatial)], name="x")
    idx = te.placeholder([int64(24), int64(2)], name="idx", dtype="int64")
    w = te.placeholder([int64(24), int64(2)], name="w")
    bias = te.placeholder([int64(24)], name="bias")
    func = te.create_prim_func([x, idx, w, bias, channel_maxplus_te(x, idx, w, bias)]).with_attr(NAN_EXACT, True)
    sch = ChannelMaxPlusCPU().apply(func, AVX2, False)
    assert sch is not None
    return sch


def _loops(sch):
    return [(loop.kind, loop.extent) for loop in map(sch.get, sch.get_loops(sch.get_sblock(KERNEL)))]


def test_cpu_loop_nest_vectorises_runs_of_the_spatial_axis():
    """56 x 56 positions: one block, its spatial loops fused and split into runs of 64 positions, parallel
    over (image, output channel, run), each run vectorised."""
    (parallel, chunks), (vectorized, run) = _loops(_cpu_schedule(56, 56))
    assert parallel == tirx.ForKind.PARALLEL and "n * T.int64(1176)" in str(chunks)  # n x 24 channels x 49 runs
    assert (vectorized, int(run)) == (tirx.ForKind.VECTORIZED, 64)


def test_cpu_loop_nest_of_a_small_map_is_one_run():
    (parallel, _), (vectorized, run) = _loops(_cpu_schedule(7, 7))
    assert parallel == tirx.ForKind.PARALLEL and (vectorized, int(run)) == (tirx.ForKind.VECTORIZED, 49)


def test_cpu_loop_nest_of_a_symbolic_spatial_size_is_scalar():
    (parallel, _), (serial, _) = _loops(_cpu_schedule(tirx.Var("length", "int64")))
    assert parallel == tirx.ForKind.PARALLEL and serial == tirx.ForKind.SERIAL


def test_cpu_runs_compile_to_vector_loads():
    """The kernel is marked NaN-exact, so nan_propagation leaves its maxes without Let-bound operands (those
    made TVM's vectorizer scalarize the run): the compiled kernel loads x a vector at a time."""
    sch = _cpu_schedule(8, 8)
    llvm = tvm.compile(propagate_nan(sch.mod, AVX2), target=AVX2).mod.inspect_source("ll")
    assert re.search(r"load <8 x float>", llvm)


@pytest.mark.parametrize("k", [2, 8, 16])
def test_the_kernel_reads_each_candidate_twice_whatever_k(k):
    """Its expression grows linearly with k: each candidate read by the maxes and by the NaN check. A select
    per max (each operand in the NaN check, the compare and the value) grew as 5 ** log2(k): k = 8 took a
    minute to compile."""
    x = te.placeholder([tirx.Var("n", "int64"), 32, 7, 7], name="x")
    idx = te.placeholder([24, k], name="idx", dtype="int64")
    w, bias = te.placeholder([24, k], name="w"), te.placeholder([24], name="bias")
    func = te.create_prim_func([x, idx, w, bias, channel_maxplus_te(x, idx, w, bias)])
    store = next(line for line in func.script().splitlines() if " = T.Select(" in line)
    assert len(re.findall(r"\bx\[", store)) == 2 * k  # the loads of x
