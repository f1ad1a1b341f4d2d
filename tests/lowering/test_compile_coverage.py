"""compile() on what users write: negative dims on symbolic shapes, inputs that keep their own dynamic
dims, and every failure a StructfxError naming its stage, the op and the fix, with nothing written."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import structfx as sfx
import structfx.lowering.build as build
from structfx.lowering.compat import tvm


def _close(got, want) -> bool:
    return all(torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(
        torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)))


class Diff(nn.Module):
    def forward(self, x):
        return torch.diff(x, dim=-1)


class Narrow(nn.Module):
    def forward(self, x):
        return x.narrow(-1, 1, x.shape[-1] - 1)


class NegativeDims(nn.Module):
    """One op of each kind that takes a dimension, every one given as a negative number."""

    def forward(self, x):  # x (B, 4, 6)
        a, b = x.split(3, dim=-1)
        return (
            torch.softmax(x, dim=-1), x.flatten(-2, -1), x.transpose(-1, -2), x.unsqueeze(-1), torch.cat([a, b], -1),
            torch.stack([a, b], dim=-1), x.sum(dim=-1), x.cumsum(-2), x.flip(-1), x.roll(1, dims=-1),
            x.mean(dim=(-2, -1)), x.select(-1, 2), x.movedim(-1, 1), x[..., :1].squeeze(-1),
            x.narrow(-2, 1, 2), torch.diff(x, dim=-2),
        )


@pytest.mark.parametrize("module, shape", [(Diff(), (8, 64)), (Narrow(), (8, 64)), (NegativeDims(), (5, 4, 6))],
                         ids=["diff", "narrow", "family"])
def test_negative_dims_on_a_symbolic_batch(module, shape):
    compiled = sfx.compile(module, torch.randn(*shape))
    for batch in (1, 3):
        x = torch.randn(batch, *shape[1:])
        assert _close(compiled(x), module(x))


class AddBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x, bias):
        return self.linear(x) + bias


class AddMask(nn.Module):
    def forward(self, x, mask):
        return x @ x.transpose(-1, -2) + mask


@pytest.mark.parametrize("module, example, other", [
    (AddBias(), (torch.randn(8, 64), torch.randn(64)), (torch.randn(3, 64), torch.randn(64))),
    (AddMask(), (torch.randn(4, 6, 5), torch.randn(6, 6)), (torch.randn(1, 6, 5), torch.randn(6, 6))),
], ids=["bias", "mask"])
def test_an_input_without_a_batch_dim_stays_static_and_says_so(module, example, other):
    with pytest.warns(UserWarning, match=r"dim 0 \(batch\) of input '(bias|mask)' fixed at the example's size.*"
                                         r"specialized it to be a constant \((64|6)\)"):
        compiled = sfx.compile(module.eval(), example)
    assert compiled.inputs[0].shape[0] == "batch" and compiled.inputs[1].shape == tuple(example[1].shape)
    with torch.no_grad():
        assert _close(compiled(*other), module(*other))


def test_one_shared_batch_exports_once_without_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiling")
        compiled = sfx.compile(AddMask(), (torch.randn(4, 6, 5), torch.randn(4, 6, 6)))
    assert [s.shape[0] for s in compiled.inputs] == ["batch", "batch"]
    with pytest.raises(sfx.StructfxError, match="batch is 2 in x; they must match"):
        compiled(torch.randn(2, 6, 5), torch.randn(3, 6, 6))


def test_sequence_length_varies_up_to_the_model_maximum():
    from tests.lowering.zoo import ZOO

    entry = next(e for e in ZOO if e.name == "bert")
    model = entry.build()
    compiled = sfx.compile(model, entry.inputs(2, 16))
    for batch, length in [(1, 5), (3, 32)]:
        inputs = entry.inputs(batch, length)
        with torch.no_grad():
            assert _close(compiled(*inputs).last_hidden_state, model(*inputs).last_hidden_state)
    with pytest.raises(sfx.StructfxError, match="sequence must be from 1 to 32"):
        compiled(*entry.inputs(1, 33))


# ---- failures: each a StructfxError naming the stage, the op and the fix, and nothing written ----

class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(x)


class KeywordOnly(nn.Module):
    def forward(self, *, x):
        return x * 2


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Opaque:
    def __init__(self, value) -> None:
        self.value = value


class ReturnsAnObject(nn.Module):
    def forward(self, x):
        return Opaque(x * 2)


class LogGamma(nn.Module):
    def forward(self, x):
        return torch.lgamma(x) + 1


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert list(tmp_path.iterdir()) == []  # nothing written


FAILURES = [
    (Linear(), torch.arange(16).reshape(2, 8),
     r"\[export\] Linear fails on the example inputs in eager PyTorch.*input 'x' has the wrong dtype for a model that "
     r"computes in float32 \(given x: \(2, 8\) int64\); pass float32 tensors"),
    (KeywordOnly(), torch.randn(2, 8),
     r"KeywordOnly.forward takes x as keyword-only.*wrap it in a module whose forward\(self, x\) calls model\(x=x\)"),
    (Linear(), ({"x": torch.randn(2, 8)},), r"example input 'x' is a dict: compile takes tensors, passed positionally"),
    (Branchy(), torch.randn(2, 8), r"\[export\] torch.export could not capture Branchy at .*test_compile_coverage.py:"
                                   r"\d+.*no Python control flow on tensor values"),
    (ReturnsAnObject(), torch.randn(2, 8),
     r"\[export\] torch.export could not capture ReturnsAnObject(?!.*control flow)"),
    (LogGamma(), torch.rand(2, 8) + 1, r"\[import\] TVM cannot import fx node %lgamma.*aten.lgamma.default.*"
                                       r"rewrite that part of forward with ops it does"),
]


@pytest.mark.parametrize("module, example, message", FAILURES,
                         ids=["dtype", "keyword_only", "dict", "control_flow", "not_control_flow", "unsupported_op"])
def test_failures_name_stage_op_and_fix(module, example, message, empty_dir):
    with pytest.raises(sfx.StructfxError, match=message) as raised:
        sfx.compile(module.eval(), example)
    assert raised.value.__cause__ is not None or "dict" in message or "keyword" in message


def test_export_failure_prints_no_graph_dump(capfd):
    with pytest.raises(sfx.StructfxError):
        sfx.compile(Branchy(), torch.randn(2, 8))
    assert "graph():" not in capfd.readouterr().err


@pytest.mark.parametrize("stage, function", [("legalize", "legalize"), ("schedule", "apply_schedules")])
def test_later_stages_are_named_and_chained(stage, function, monkeypatch, empty_dir):
    def fail(*args, **kwargs):
        raise tvm.error.InternalError("Check failed: something TVM could not do")

    monkeypatch.setattr(build, function, fail)
    with pytest.raises(sfx.StructfxError, match=rf"\[{stage}\].*Check failed: something TVM could not do") as raised:
        sfx.compile(Linear().eval(), torch.randn(2, 8))
    assert isinstance(raised.value.__cause__, tvm.error.InternalError)


def test_deberta_v2_relative_attention_compiles_and_matches():
    """DeBERTa-v2's relative-position products are a kernel with two symbolic parameters of one name (the
    batch, twice); renaming definitions over the whole module re-declared its scratch buffer in each block
    and tvm.compile failed (``Buffer ... is used before its definition``)."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    config = DebertaV2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             vocab_size=100, max_position_embeddings=64)
    model = DebertaV2Model(config).eval()
    compiled = sfx.compile(model, (torch.randint(0, 100, (2, 16)),))
    for batch, sequence in ((1, 16), (3, 9)):
        ids = torch.randint(0, 100, (batch, sequence))
        assert torch.allclose(compiled(ids)[0], model(ids).last_hidden_state, atol=1e-5)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018) as MobileNetV3 writes it: global average, 1x1 reduce, ReLU,
    1x1 expand, hard sigmoid, scale."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(scale))))


class InvertedResidual(nn.Module):
    """MobileNetV3's bottleneck: 1x1 expand, depthwise k x k (stride 2 after TF-style asymmetric zero padding),
    squeeze-and-excitation, 1x1 project, residual where the shape allows; batch norms after each conv."""

    def __init__(self, cin: int, expanded: int, cout: int, kernel: int, stride: int, act: type) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act())
        before, after = (kernel - stride) // 2, (kernel - stride + 1) // 2
        pad = nn.ZeroPad2d((before, after, before, after)) if stride == 2 else nn.Identity()
        self.depthwise = nn.Sequential(
            pad, nn.Conv2d(expanded, expanded, kernel, stride, 0 if stride == 2 else kernel // 2, groups=expanded,
                           bias=False), nn.BatchNorm2d(expanded), act())
        self.se = SqueezeExcite(expanded, max(8, expanded // 4))
        self.project = nn.Sequential(nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    """A user's own MobileNetV3/EfficientNet-style network: hard-swish stem, bottlenecks with depthwise 3x3 and
    5x5 convs, SE blocks and ReLU / hard-swish / SiLU, a 1x1 head and a global pool written as a fixed-size
    ``AvgPool2d(64, ceil_mode=True)`` (as transformers' EfficientNet does)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, 3, 1, nn.ReLU), InvertedResidual(16, 48, 24, 5, 2, nn.Hardswish),
            InvertedResidual(24, 72, 24, 5, 1, nn.SiLU), InvertedResidual(24, 72, 40, 3, 2, nn.SiLU))
        self.head = nn.Sequential(nn.Conv2d(40, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish(),
                                  nn.AvgPool2d(64, ceil_mode=True), nn.Flatten(), nn.Linear(96, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _trained_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, its batch norms given non-trivial statistics."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def test_mobilenet_v3_like_model_matches_at_any_batch():
    """Compiled at batch 2 (symbolic batch) on 29x29 images, run at batch 1 and 3; the head's pool window
    is clipped to the 3x3 map it covers (structfx/lowering/pool_windows.py)."""
    torch.manual_seed(0)
    model = _trained_statistics(MobileNetV3Like())
    compiled = sfx.compile(model, torch.randn(2, 3, 29, 29))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 29, 29, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        assert got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < 1e-5, batch
