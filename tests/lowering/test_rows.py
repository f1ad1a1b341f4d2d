"""Dense layers on flattened rows (structfx/lowering/rows.py): their reshapes are views, the elementwise ops after
them (bias, activation, residual add, gating) fuse into the dense kernel, and the model matches eager at any batch."""

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.build import legalize_module, lower_to_relax, schedule_module
from structfx.lowering.compat import relax, tirx, tvm
from structfx.lowering.export import export_for_compile
from structfx.lowering.target import host_target


class FeedForward(nn.Module):
    """A transformer's FFN block: LayerNorm(x + W2 act(W1 x)), on (batch, seq, width)."""

    def __init__(self, width: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act, self.norm = act, nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.down(self.act(self.up(x))))


class GatedMLP(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), no bias, then scaled."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x)) * 0.5 + x


class Heads(nn.Module):
    """Attention's projections: a dense layer reshaped to heads, scaled and transposed (not elementwise on rows)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)

    def forward(self, x):
        b, s, w = x.shape
        return (self.q(x).view(b, s, 2, w // 2) * 0.25).transpose(1, 2)


class SelfAttention(nn.Module):
    """A ViT block's attention: layer norm, q/k/v projections split into heads, SDPA, heads merged, output
    projection."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.norm, self.heads = nn.LayerNorm(width), heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, s, w = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, s, self.heads, w // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, s, w)) + x


MODELS = {
    "ffn_gelu": lambda: FeedForward(24, 40, nn.GELU()),
    "ffn_gelu_tanh": lambda: FeedForward(24, 40, nn.GELU(approximate="tanh")),
    "ffn_relu_odd": lambda: FeedForward(19, 37, nn.ReLU()),
    "gated_mlp": lambda: GatedMLP(24, 56),
    "heads": lambda: Heads(24),
    "self_attention": lambda: SelfAttention(24),
}


def _input(name: str, batch: int, seq: int) -> torch.Tensor:
    width = 19 if name == "ffn_relu_odd" else 24
    return torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(batch * 100 + seq))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seq", [1, 7])
def test_matches_eager_at_any_batch(name, seq):
    """The batch is symbolic (rows = batch * seq, a compound extent); the sequence is fixed at compile time."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    compiled = sfx.compile(model, _input(name, 2, seq))
    for batch in (1, 3, 4):
        x = _input(name, batch, seq)
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        assert got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < 1e-5, batch


def _fused(model: nn.Module, x: torch.Tensor):
    target = host_target()
    mod = legalize_module(lower_to_relax(export_for_compile(model, (x,)), target)[0], target)
    return relax.transform.RewriteDataflowReshape()(mod)


def _kernels_called(mod) -> list[str]:
    """Names of the PrimFuncs ``main`` calls, in order."""
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            names.append(expr.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def test_ffn_is_two_dense_kernels_with_their_epilogues_and_no_copy():
    mod = _fused(FeedForward(24, 40, nn.GELU()).eval(), _input("ffn_gelu", 2, 5))
    kernels = _kernels_called(mod)
    dense = [k for k in kernels if "dense_packed" in k]
    assert len(dense) == 2
    assert "gelu" in dense[0] and dense[0].count("add") == 1  # bias and GELU in the first kernel's epilogue
    assert dense[1].count("add") == 2  # bias and residual add in the second's
    assert not [k for k in kernels if k.startswith("reshape")]  # every reshape is a view (vm.builtin.reshape)


def test_gated_mlp_fuses_silu_gating_scale_and_residual_into_dense_kernels():
    kernels = _kernels_called(_fused(GatedMLP(24, 56).eval(), _input("gated_mlp", 2, 5)))
    dense = [k for k in kernels if "dense_packed" in k]
    assert len(dense) == len(kernels) == 3  # nothing but the three dense kernels
    assert any("sigmoid" in k and k.count("multiply") == 2 for k in dense)  # x * sigmoid(x), then * up(x)
    assert "multiply" in dense[-1] and "add" in dense[-1]  # the scale and the residual add
    assert not [k for k in kernels if k.startswith("reshape")]


def test_reshape_of_dense_rows_reads_them_as_a_view():
    """The reshape (rows, N) -> (b, s, N) is indexed by plain loop variables (no ``% rows``), so Relax's
    RewriteDataflowReshape makes it vm.builtin.reshape."""
    mod = _fused(Heads(24).eval(), _input("heads", 2, 5))
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert "% rows" not in func.script() and "rows" not in gv.name_hint
    assert not [k for k in _kernels_called(mod) if k.startswith("reshape")]


def test_reshapes_stay_views_once_scheduled():
    """``structfx.compile`` schedules every kernel before ``tvm.compile`` runs RewriteDataflowReshape, and a
    scheduled copy (split, vectorised, parallel) no longer reads as a reshape: legalization makes them views
    first. Here the flattening of the layer norm's output for the projections and the heads' split and merge
    around attention."""
    target = host_target()
    model = SelfAttention(24).eval()
    mod = legalize_module(lower_to_relax(export_for_compile(model, (_input("self_attention", 2, 5),)), target)[0],
                          target)
    kernels = _kernels_called(schedule_module(mod, target))
    assert len([k for k in kernels if "dense_packed" in k]) == 4
    assert not [k for k in kernels if k.startswith("reshape")]
