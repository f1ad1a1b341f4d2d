"""Shape ops import with the shapes torch.export proved (structfx/lowering/shape_ops.py, aten.py's
``convert_index``, graph_fixes.py): view/reshape/flatten/unflatten/movedim/permute with -1 entries, sizes
computed from the symbolic batch and negative dims; expand with -1 and of broadcast (zero-stride) views;
repeat/tile with a symbolic count; arange with a negative step; indexing with several index tensors; and
``None`` slice bounds. Each compiles with a symbolic batch and matches eager at batches 1 to 3."""

from __future__ import annotations

import re

import pytest
import sympy
import torch
from torch import nn
from torch.utils._sympy.functions import CeilDiv, FloorDiv, Max, Mod

import structfx as sfx
from structfx.lowering import aten
from structfx.lowering.compat import tirx, tvm
from structfx.lowering.shape_ops import tir_size


class Views(nn.Module):
    def forward(self, x):  # x: (batch, 6, 8)
        b = x.size(0)
        a = x.view(b, -1, 4).permute(0, -1, -2)  # (b, 4, 12)
        c = x.reshape(b * 2, -1).unflatten(1, (3, -1))  # (2b, 3, 8)
        d = x.movedim(1, -1).flatten(1)  # (b, 48)
        e = x.transpose(-1, -2).reshape(-1, 6)  # (8b, 6)
        same_rank = e.reshape(b, 48)  # (8b, 6) -> (b, 48): TVM compared the shapes in Python (GPTBigCode)
        return a.reshape(b, -1) + d, c.reshape(b, 48) * same_rank, e.view(b, 8, 6).sum(-1)


class Expands(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):  # x: (batch, 6, 8)
        b = x.size(0)
        tokens = self.token.expand(b, -1, -1)  # (b, 1, 8)
        broadcast = x[:, :1].expand(-1, 6, -1)  # a zero-stride view of x, then read as a contiguous tensor
        grid = x[:, None].expand(-1, 3, -1, -1).reshape(b * 3, 6, 8)
        return torch.cat([tokens, broadcast.reshape(b, 6, 8)], 1), grid.view(b, 3, 48).expand_as(grid.view(b, 3, 48))


class Repeats(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(2, 5, 5))

    def forward(self, x):  # x: (batch, 6, 8)
        b = x.size(0)
        bias = self.bias.unsqueeze(0).repeat(b, 1, 1, 1)  # WavLM's position bias: a symbolic count
        tiled = torch.tile(self.bias[0], (b, 2))  # (5b, 10)
        twice = x.repeat(1, 2, 1)  # static counts
        return bias.view(b * 2, 5, 5), tiled, twice


class Aranges(nn.Module):
    def forward(self, x):  # x: (batch, 16)
        down = torch.arange(8, -8, -1)  # Funnel's relative positions: 16 values
        odd = torch.arange(5, -5, -2)  # 5 values
        return x * down, x[:, :5] + odd, x[:, :4] * torch.arange(1.0, 0.0, -0.25)


class Indexing(nn.Module):
    def forward(self, x):  # x: (batch, 4, 10, 3)
        rows = torch.arange(5).unsqueeze(1) + torch.arange(6).unsqueeze(0)  # (5, 6)
        column = torch.tensor([[2]])
        trailing = x[:, :, rows, column]  # ConvBERT's unfold: (b, 4, 5, 6)
        middle = x[:, torch.tensor([0, -1]), torch.tensor([1, 2])]  # (b, 2, 3), the negative index wrapped
        leading = x[torch.tensor([0, 1]), torch.tensor([1, 2])]  # (2, 10, 3)
        apart = x[:, torch.tensor([0, 3]), :, torch.tensor([2, 1])]  # not adjacent: (2, b, 10)
        return trailing, middle, leading, apart


class SliceBounds(nn.Module):
    def forward(self, x):  # x: (batch, 6, 8)
        h = x.clone()
        h[..., :3] = 0.0
        h[:, 2:, 5:] = 1.0
        return h * 2.0


def _check(model: nn.Module, shape: tuple, batches=(1, 2, 3)):
    compiled = sfx.compile(model.eval(), torch.randn(2, *shape))
    for batch in batches:
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        got, want = compiled(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [Views(), Expands(), Repeats(), SliceBounds()], ids=lambda m: type(m).__name__)
def test_shape_ops_on_a_symbolic_batch_match_eager(model):
    _check(model, (6, 8))


def test_arange_with_a_negative_step_has_torchs_length():
    _check(Aranges(), (16,))


def test_indexing_with_several_index_tensors_matches_eager():
    model = Indexing().eval()
    compiled = sfx.compile(model, torch.randn(2, 4, 10, 3))
    for batch in (2, 3):  # the leading index takes rows 0 and -1: two rows at least
        x = torch.randn(batch, 4, 10, 3, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_sizes_translate_to_tir():
    s = sympy.Symbol("s0", integer=True, positive=True)
    var = tirx.Var("s0", "int64")
    analyzer = tvm.sym.Analyzer()
    for expr, want in [
        (s * 3 + 1, var * 3 + 1),
        (FloorDiv(s, 2), tirx.floordiv(var, 2)),
        (CeilDiv(s, 4), tirx.floordiv(var + 3, 4)),
        (Mod(s, 5), tirx.floormod(var, 5)),
        (Max(s, 7), tirx.max(var, 7)),
        (s**2, var * var),
    ]:
        assert analyzer.can_prove_equal(tir_size(expr, {"s0": var}), want), expr
    assert tir_size(sympy.Symbol("u0"), {"s0": var}) is None  # an unbacked size: TVM's converter instead


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1) * 2.0


def test_a_failing_converter_is_named_with_its_shapes_not_called_unsupported(monkeypatch):
    def fail(node, importer):
        raise tvm.error.InternalError("Check failed: a shape TVM cannot take")

    monkeypatch.setitem(aten.CONVERTERS, "view.default", fail)
    with pytest.raises(sfx.StructfxError) as raised:
        sfx.compile(Flatten().eval(), torch.randn(2, 6, 8))
    message = str(raised.value)
    assert re.search(r"\[import\] TVM's converter of aten\.view\.default failed on fx node %view.*"
                     r"operands x: \(s\d+, 6, 8\).*torch's result \(s\d+, 48\)\).*a shape TVM cannot take", message)
    assert "the op is supported" in message and "rewrite" not in message
    assert isinstance(raised.value.__cause__, tvm.error.InternalError)


def _gptbigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeModel

    return GPTBigCodeModel(GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64))


def _convbert():
    from transformers import ConvBertConfig, ConvBertModel

    return ConvBertModel(ConvBertConfig(vocab_size=VOCAB, hidden_size=64, embedding_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=64))


def _funnel():
    from transformers import FunnelConfig, FunnelModel

    return FunnelModel(FunnelConfig(vocab_size=VOCAB, d_model=64, n_head=2, d_head=32, d_inner=128, block_sizes=[1, 1],
                                    num_decoder_layers=1))


def _wavlm():
    from transformers import WavLMConfig, WavLMModel

    config = WavLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=32)
    return WavLMModel(config)


VOCAB = 100
MODELS = {  # name: (build, inputs(batch)); each failed at [import] on a shape op before shape_ops
    "gptbigcode": (_gptbigcode, lambda b: torch.randint(0, VOCAB, (b, 8), generator=torch.Generator().manual_seed(b))),
    "convbert": (_convbert, lambda b: torch.randint(0, VOCAB, (b, 8), generator=torch.Generator().manual_seed(b))),
    "funnel": (_funnel, lambda b: torch.randint(0, VOCAB, (b, 8), generator=torch.Generator().manual_seed(b))),
    "wavlm": (_wavlm, lambda b: torch.randn(b, 400, generator=torch.Generator().manual_seed(b))),
}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def _leaves(output) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


#: Each model as it is; transformed once (the transform adds our ops, not shape ops: one keeps the suite short).
CASES = [(name, False) for name in MODELS] + [("convbert", True)]


@pytest.mark.parametrize("name, transformed", CASES,
                         ids=[f"{n}-{'transformed' if t else 'original'}" for n, t in CASES])
def test_models_with_shape_ops_compile_and_match_eager(name, transformed):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    if transformed:
        model = sfx.transform(model, [sfx.BTT(rank=4), sfx.MaxPlus(k=2)], example_inputs=(inputs(2),)).eval()
        assert any(type(m).__module__.startswith("structfx.nn") for m in model.modules())
    compiled = sfx.compile(model, (inputs(2),))
    for batch in (1, 2):
        with torch.no_grad():
            want = _leaves(model(inputs(batch)))
        got = _leaves(compiled(inputs(batch)))
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(_relative(g, w) < 1e-4 for g, w in zip(got, want)), f"batch {batch}"
