"""What every field model is held to: transform raises nothing but StructfxError, changes neither the model
nor the user's tensors, and the result computes what the model computed (on every input given, each of
which may have another shape or take another branch), including what it does to its inputs in place."""

from __future__ import annotations

import copy

import torch
from torch import nn

import structfx as sfx

#: Rules that promise exactness: max-plus with init="relu", max-plus pooling of max pools, BTT at full rank.
EXACT_RULES = [sfx.BTT(rank=10**6), sfx.MaxPlus(k=2), sfx.MaxPlusPool()]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def transformed(model: nn.Module, inputs: list[tuple], rules=None, calibration=None) -> nn.Module:
    """``transform`` on ``inputs[0]``, checked: the model, its buffers and the inputs are left as they were."""
    model_copy = copy.deepcopy(model)
    user_inputs = copy.deepcopy(inputs)
    small = sfx.transform(model, rules or EXACT_RULES, example_inputs=inputs[0], calibration=calibration)
    assert_same_state(model, model_copy)
    assert all(torch.equal(a, b) for got, want in zip(inputs, user_inputs) for a, b in zip(got, want))
    assert small.training == model.training
    return small


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()]


def assert_computes_the_same(small: nn.Module, model: nn.Module, inputs: list[tuple], tolerance: float = 1e-5):
    """Outputs within ``tolerance`` (relative) on every input, and the inputs changed alike; both in eval
    mode, each on its own copies."""
    for args in inputs:
        mine, theirs = copy.deepcopy(args), copy.deepcopy(args)
        with torch.no_grad():
            modes = [(m, m.training) for m in [*small.modules(), *model.modules()]]
            small.eval(), model.eval()
            try:
                got, want = small(*mine), model(*theirs)
            finally:
                for m, training in modes:
                    m.training = training
        assert relative_error(got, want) <= tolerance, relative_error(got, want)
        for a, b in zip(mine, theirs):
            assert relative_error(a, b) <= tolerance if a.is_floating_point() else torch.equal(a, b)


def rows(small: nn.Module) -> dict[str, object]:
    return {row.name: row for row in sfx.report(small).rows}
