"""Property: transform with the exact rules computes what the model computed, on random small programs.

Each program is a forward written step by step from: Linear or Conv2d layers (a layer may be called again),
every spelling of ReLU (module, in-place module as a statement, F.relu, torch.relu, x.relu(), in-place
functional and method forms, in place through a view), residual adds (with the saved tensor aliasing the
running one), a nested Sequential inside a ModuleList, ``F.linear`` on the program's own parameters (a max
pool in conv programs), a child called with a bool flag that the data picks, and a data-dependent branch
that makes symbolic tracing fail (the fallback path). The transformed model must give the same outputs on
inputs taking either branch, change its inputs as the model does, and leave the model and the inputs
alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import structfx as sfx
from tests.passes.field.harness import assert_computes_the_same, assert_same_state

RULES = [sfx.BTT(rank=10**6, min_features=1), sfx.MaxPlus(k=2, min_features=1), sfx.MaxPlusPool(min_features=1)]
STEPS = (
    "layer", "relu_module", "relu_inplace_statement", "f_relu", "torch_relu", "method_relu", "f_relu_inplace",
    "method_relu_", "relu_on_view", "save", "residual", "nested", "input_relu_", "branch", "own_linear", "gate",
)


class Gate(nn.Module):
    """A layer and a ReLU, its output doubled or not by a flag."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h, double: bool = False):
        h = F.relu(self.layer(h))
        return h * 2 if double else h


class Program(nn.Module):
    """A forward interpreted from ``steps``: (step name, layer index) pairs, unrolled when traced."""

    def __init__(self, steps: list[tuple[str, int]], conv: bool, width: int) -> None:
        super().__init__()

        def layer() -> nn.Module:
            return nn.Conv2d(width, width, 3, padding=1) if conv else nn.Linear(width, width)

        self.steps, self.conv = steps, conv
        self.layers = nn.ModuleList(layer() for _ in range(3))
        self.act, self.act_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.blocks = nn.ModuleList([nn.Sequential(layer(), nn.ReLU()), nn.Sequential(nn.ReLU(), layer())])
        self.gate = Gate(layer())
        self.weight = nn.Parameter(torch.randn(width, width, generator=torch.Generator().manual_seed(width)))
        self.bias = nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(width + 1)))

    def forward(self, x):
        h = saved = self.layers[0](x)
        for step, index in self.steps:
            if step == "layer":
                h = self.layers[index](h)
            elif step == "relu_module":
                h = self.act(h)
            elif step == "relu_inplace_statement":
                self.act_inplace(h)
            elif step == "f_relu":
                h = F.relu(h)
            elif step == "torch_relu":
                h = torch.relu(h)
            elif step == "method_relu":
                h = h.relu()
            elif step == "f_relu_inplace":
                F.relu(h, inplace=True)
            elif step == "method_relu_":
                h.relu_()
            elif step == "relu_on_view":
                torch.relu_(h.view(h.shape[0], h.shape[1], -1) if self.conv else h.unsqueeze(1))
            elif step == "save":
                saved = h
            elif step == "residual":
                h = h + saved
            elif step == "nested":
                h = self.blocks[index % 2](h)
            elif step == "input_relu_":
                x.relu_()
                h = h + self.layers[index](x)
            elif step == "branch" and h.sum() > 0:
                h = h * 0.5
            elif step == "own_linear" and self.conv:
                h = F.max_pool2d(h, 3, stride=1, padding=1)
            elif step == "own_linear":
                h = F.linear(h, self.weight, self.bias)
            elif step == "gate":
                h = self.gate(h, bool(h.mean() > 0))
        return h


@st.composite
def programs(draw):
    conv = draw(st.booleans())
    steps = draw(st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 2)), min_size=1, max_size=7))
    return conv, steps


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_exact_rules_preserve_random_programs(program):
    conv, steps = program
    torch.manual_seed(0)
    width = 3 if conv else 4
    model = Program(steps, conv, width).eval()
    shape = (2, width, 4, 4) if conv else (3, width)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    inputs = [(x,), (-x,)]  # whichever way the branch goes on one, the other tends to take the other way
    model_copy, inputs_copy = copy.deepcopy(model), copy.deepcopy(inputs)
    small = sfx.transform(model, RULES, example_inputs=inputs[0], calibration=[inputs[1]])
    assert_same_state(model, model_copy)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(inputs, inputs_copy))
    assert_computes_the_same(small, model, inputs)
    # every rewrite here is provable: the safety net firing would mean a rewiring fault it had to hide
    assert not [row for row in sfx.report(small).rows if row.reason.startswith("not rewritten")]
