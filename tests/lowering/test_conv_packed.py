"""Convolutions on weights prepared at compile time (structfx/lowering/conv_packing.py: batch norms folded,
output channels packed) and their schedule rule (structfx/lowering/schedule_rules/conv_packed.py):
numerics against torch at odd sizes, strides, dilations, padding, groups, batch 1 and a symbolic batch;
the loop nest the rule promises under named targets; the tile choice; batch norm folding."""

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.build import lower_to_relax
from structfx.lowering.compat import Target, relax, te, tirx, tvm
from structfx.lowering.conv_packing import (
    ACCUMULATE,
    MAX_VECTORS,
    SHORT_REDUCTION,
    Tile,
    choose_tile,
    conv_packed,
    pack,
)
from structfx.lowering.export import example_arguments, export_for_compile
from structfx.lowering.schedule_rules.conv_packed import ConvPacked

AVX2 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512f"]})
AVX512 = Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


def _with_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, its batch norms given non-trivial statistics."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator))
    return model.eval()


class Residual(nn.Module):
    """conv -> batch norm -> ReLU, plus a 1x1 stride-2 shortcut with its own batch norm (ResNet's block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)) + self.shortcut(x))


CASES = {
    "3x3_bn_relu": (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
                    (3, 13, 11)),
    "stride2_odd_channels": (nn.Sequential(nn.Conv2d(5, 24, 3, stride=2, padding=1), nn.ReLU6()), (5, 13, 7)),
    "7x7_stride2_stem": (nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8)),
                         (3, 17, 19)),
    "grouped": (nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.ReLU()), (32, 5, 5)),
    "dilated": (nn.Conv2d(4, 8, 3, dilation=2, padding=2), (4, 9, 10)),
    "1x1_2x2_output": (nn.Conv2d(16, 40, 1), (16, 2, 2)),
    "residual_block": (Residual(), (8, 9, 9)),
    "conv1d_kernel10_stride5": (nn.Sequential(nn.Conv1d(1, 16, 10, stride=5, bias=False), nn.GELU()), (1, 101)),
    "conv1d_same_even_kernel": (nn.Conv1d(6, 8, 4, padding="same"), (6, 23)),
    "conv1d_grouped_positional": (nn.Conv1d(32, 32, 5, padding=2, groups=2), (32, 19)),
    "depthwise_stays_on_conv": (nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)),
                                (16, 6, 6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_convolutions_match_torch_at_any_batch(name):
    """Compiled at batch 3 (symbolic batch), run at batch 1 and 5."""
    module, shape = CASES[name]
    torch.manual_seed(0)
    model = _with_statistics(module)
    compiled = sfx.compile(model, torch.randn(3, *shape))
    for batch in (1, 5):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        assert float((got - want).norm() / want.norm()) < 1e-5, (name, batch)


class PaddedNext(nn.Module):
    """conv -> batch norm -> ReLU6, then the next layer's zero padding as its own op (HF MobileNetV2's TF
    padding): fusion puts the pad after the conv's epilogue in one kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)

    def forward(self, x):
        return self.depthwise(nn.functional.pad(nn.functional.relu6(self.norm(self.conv(x))), (1, 1, 1, 1)))


def test_padding_fused_after_the_epilogue_is_written_whole():
    """Every element of the padded output is written on every call: the border no conv tile covers
    included (read uninitialised, the result changed from call to call)."""
    model = _with_statistics(PaddedNext())
    compiled = sfx.compile(model, torch.randn(2, 8, 7, 7))
    for batch in (3, 1, 3, 2, 3):
        x = torch.randn(batch, 8, 7, 7, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        assert float((compiled(x) - want).norm() / want.norm()) < 1e-5, batch


def _relax_main(model, x):
    program = export_for_compile(model, example_arguments((x,), "compile"))
    mod, _ = lower_to_relax(program, AVX2)
    return mod


def _ops(func) -> list[str]:
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e.op.name) if isinstance(e, relax.Call) and
                                    isinstance(e.op, tvm.ir.Op) else None)
    return found


def test_batch_norms_fold_into_their_convolutions_and_weights_are_prepared_once():
    """No batch norm and no weight computation is left in the compiled main: the folded, packed
    weights are its parameters (the dense layer's too); the depthwise conv's batch norm folds as well."""
    model = _with_statistics(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)))
    mod = _relax_main(model, torch.randn(2, 3, 8, 8))
    ops = _ops(mod["main"])
    assert "relax.nn.batch_norm" not in ops
    assert "relax.multiply" not in ops and "relax.permute_dims" not in ops  # lifted: run at compile time
    assert ops.count("relax.call_tir") == 1 and "relax.nn.conv2d" in ops  # conv_packed, and the depthwise conv
    main = mod["main"]
    shapes = [[int(d) for d in p.ty.shape] for p in main.params[int(main.attrs["num_input"]):]]
    assert [1, 3, 3, 3, 16] in shapes  # 16 channels: one packed block of MR = 16


def test_a_convolution_used_twice_still_folds_correctly():
    """The conv's output feeds its batch norm and the output too: the fold adds a second conv, the first stays."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) * y

    model = _with_statistics(Both())
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        want = model(x)
    assert float((sfx.compile(model, x)(x) - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("rows,cols,fg,f", [(2, 2, 256, 256), (8, 8, 64, 64), (1, 799, 64, 64), (16, 16, 16, 32),
                                            (1, 49, 24, 24)])
def test_tile_fills_the_registers_with_little_waste(rows, cols, fg, f):
    tile = choose_tile(rows, cols, fg, f, 8)
    accumulators = tile.vectors * tile.rows * tile.cols
    assert 8 <= accumulators <= 12
    assert rows % tile.rows == 0
    if fg != f:
        assert fg % (tile.vectors * 8) == 0  # a tile's channels share their group's inputs
    padded_cols = -(-cols // tile.cols) * tile.cols
    assert padded_cols / cols < 1.15
    if (rows, cols) == (2, 2):
        assert (tile.rows, tile.cols) == (2, 2)  # a 2x2 output: both rows in one tile


@pytest.mark.parametrize("rows,cols,fg,f", [(32, 32, 48, 48), (16, 16, 96, 96), (8, 8, 64, 64), (1, 49, 24, 24)])
def test_short_reductions_take_tiles_of_at_most_two_vectors_of_channels(rows, cols, fg, f):
    """EfficientNet's 1x1 expansions of 16 channels to 48 took a 3-vector tile and ran 4x slower than with 2;
    long reductions (ResNet's 3x3 convs) keep the wider tiles."""
    short = choose_tile(rows, cols, fg, f, 8, reduction=16)
    assert short.vectors <= MAX_VECTORS == 2
    if (rows, cols, f) == (32, 32, 48):
        assert short == Tile(vectors=2, rows=1, cols=4)
        assert choose_tile(rows, cols, fg, f, 8, reduction=SHORT_REDUCTION).vectors == 3


def test_pack_lays_out_blocks_of_output_channels():
    w = np.random.default_rng(0).standard_normal((20, 3, 2, 2)).astype("float32")
    bb = relax.BlockBuilder()
    param = relax.Var("w", relax.TensorType([20, 3, 2, 2], "float32"))
    with bb.function("main", [param]):
        bb.emit_func_output(pack(param, 8))
    lib = tvm.compile(bb.get(), target=Target("llvm"))
    got = relax.VirtualMachine(lib, tvm.cpu())["main"](tvm.runtime.tensor(w, tvm.cpu())).numpy()
    padded = np.concatenate([w, np.zeros((4, 3, 2, 2), "float32")])
    assert got.shape == (3, 3, 2, 2, 8)
    np.testing.assert_array_equal(got, padded.reshape(3, 8, 3, 2, 2).transpose(0, 2, 3, 4, 1))


def _packed_conv_func(batch, lanes, tile):
    x = te.placeholder((batch, 16, 9, 10), name="x")
    mr = tile.vectors * lanes
    packed = te.placeholder((64 // mr, 16, 3, 3, mr), name="packed")
    bias = te.placeholder((64,), name="bias")
    y = conv_packed(x, packed, [1, 1], [1, 1, 1, 1], [1, 1], 1, 64, tile)
    out = te.compute(y.shape, lambda n, f, i, j: te.max(y[n, f, i, j] + bias[f], tirx.const(0.0, "float32")),
                     name="relu")
    return te.create_prim_func([x, packed, bias, out])


@pytest.mark.parametrize("target,lanes", [(AVX2, 8), (AVX512, 16)], ids=["avx2", "avx512"])
def test_structure_channel_vectors_by_positions_in_parallel_tiles(target, lanes):
    """Tiles over (batch, channel blocks, rows, column blocks) fused into one parallel loop; inside, the
    whole reduction (input channels, kernel rows, kernel columns), then the tile's positions unrolled and
    its MR output channels vectorised; the accumulators compacted to the tile (a stack array)."""
    tile = Tile(vectors=2, rows=1, cols=5)
    sch = ConvPacked().apply(_packed_conv_func(tirx.Var("n", "int64"), lanes, tile), target, False)
    assert sch is not None
    update = sch.get_sblock(f"{ACCUMULATE}_update")
    loops = [sch.get(loop) for loop in sch.get_loops(update)]
    kind = tirx.ForKind
    assert [loop.kind for loop in loops] == [kind.PARALLEL, kind.SERIAL, kind.SERIAL, kind.SERIAL, kind.UNROLLED,
                                             kind.VECTORIZED]
    assert [int(loop.extent) for loop in loops[1:]] == [16, 3, 3, 5, 2 * lanes]
    passes = tvm.s_tir.transform
    lowered = passes.PlanAndUpdateBufferAllocationLocation()(passes.LowerInitBlock()(sch.mod))
    compacted = passes.CompactBufferAllocation()(passes.ConvertBlocksToOpaque()(lowered))
    assert f"alloc_buffer((T.int64(1), {2 * lanes}, 1, 5))" in compacted.script()


def test_rule_matches_numpy_with_a_padded_column_tail():
    """10 output columns in tiles of 4 (two padded, never stored), 64 channels in blocks of 16."""
    tile = Tile(vectors=2, rows=1, cols=4)
    sch = ConvPacked().apply(_packed_conv_func(2, 8, tile), AVX2, False)
    lib = tvm.compile(sch.mod, target=AVX2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 9, 10)).astype("float32")
    w = rng.standard_normal((64, 16, 3, 3)).astype("float32")
    b = rng.standard_normal(64).astype("float32")
    packed = np.ascontiguousarray(w.reshape(4, 16, 16, 3, 3).transpose(0, 2, 3, 4, 1))
    arrays = [x, packed, b, np.zeros((2, 64, 9, 10), "float32")]
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    lib["main"](*args)
    want = torch.relu(nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1))
    got = torch.from_numpy(args[-1].numpy())
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_other_functions_are_left_to_other_rules():
    x, w = te.placeholder((8, 16), name="x"), te.placeholder((4, 16), name="w")
    r = te.reduce_axis((0, 16), "r")
    y = te.compute((8, 4), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="NT_matmul")
    assert ConvPacked().apply(te.create_prim_func([x, w, y]), AVX2, False) is None
