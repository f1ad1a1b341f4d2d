"""Kind 13: ``F.linear`` on a module's own parameters, in a forward that cannot be traced whole, becomes a
replaceable layer that takes over those parameters (one per weight, shared by its calls), on either branch;
calls that cannot be made one are kept and listed."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, SparseMaxPlus
from tests.passes.field.field_b import relative, transformed

EXACT = [sfx.BTT(rank=10**6), sfx.MaxPlus(k=2)]


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rows(result: nn.Module) -> dict[str, object]:
    return {row.name: row for row in sfx.report(result).rows}


class OwnWeights(nn.Module):
    """Parameters of its own, F.linear in every spelling, a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(64, 64) / 8)
        self.b_in = nn.Parameter(torch.randn(64) / 8)
        self.w_out = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        h = F.relu(F.linear(x, self.w_in, self.b_in))
        if h.sum() > 0:
            h = torch.nn.functional.linear(input=h, weight=self.w_out)
        return F.linear(h, self.w_out, bias=None) + x


def test_f_linear_on_own_parameters_is_replaced_on_either_branch():
    torch.manual_seed(0)
    model = OwnWeights()
    target = torch.full((8, 64), -10.0) - model.b_in.detach()  # rows whose first layer gives -10 everywhere
    inputs = [(_x(8, 64),), (torch.linalg.solve(model.w_in.detach(), target.T).T,)]
    with torch.no_grad():  # the second input does not take the branch
        assert float(F.relu(F.linear(inputs[1][0], model.w_in, model.b_in)).sum()) == 0
    result = transformed(model, EXACT, inputs[0], calibration=[inputs[1]])
    assert type(result) is OwnWeights
    assert isinstance(result.linear, BTTLinear) and isinstance(result.linear_1, BTTLinear)
    assert isinstance(result.relu, SparseMaxPlus)
    assert {name for name, _ in result.named_parameters()}.isdisjoint({"w_in", "b_in", "w_out"})
    with torch.no_grad():
        for (x,) in inputs:
            assert relative(result(x.clone()), model(x.clone())) < 1e-5


def test_f_linear_replacement_saves_its_parameters_and_keeps_the_model_intact():
    torch.manual_seed(0)
    model = OwnWeights()
    before = copy.deepcopy(model)
    result = transformed(model, [sfx.BTT(rank=2)], (_x(8, 64),))
    assert isinstance(result.linear, BTTLinear) and isinstance(result.linear_1, BTTLinear)
    assert sum(p.numel() for p in result.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert model.w_in is not result.linear and torch.equal(model.w_in, before.w_in)
    assert {"linear", "linear_1"} <= {row.name for row in sfx.report(result).replaced}


class ReadElsewhere(nn.Module):
    """One weight also read as a transpose (kept), one used twice (one replacement, shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.tied = nn.Parameter(torch.randn(64, 64) / 8)
        self.shared = nn.Parameter(torch.randn(64, 64) / 8)
        self.bias = nn.Parameter(torch.randn(64) / 8)

    def forward(self, x):
        if x.mean() > 10:
            x = x / 2
        h = F.linear(x, self.tied) + x @ self.tied.T
        return F.linear(F.linear(h, self.shared, self.bias), self.shared, self.bias)


def test_f_linear_whose_weight_is_read_otherwise_is_kept_and_a_reused_one_is_shared():
    torch.manual_seed(0)
    model = ReadElsewhere()
    x = _x(8, 64)
    result = transformed(model, EXACT, (x,))
    assert isinstance(result.tied, nn.Parameter)  # still the module's own
    assert isinstance(result.linear, BTTLinear) and not hasattr(result, "linear_1")
    row = _rows(result)["<F.linear(x, self.tied)>"]
    assert row.status == "skipped" and "read some other way" in row.reason
    with torch.no_grad():
        assert relative(result(x), model(x)) < 1e-5


class TiedOwner(nn.Module):
    """Its weight is also another module's: replacing it would untie them."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return F.linear(x, self.weight)


class TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        self.head = TiedOwner(self.embed)

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_f_linear_on_a_tied_weight_stays_tied():
    torch.manual_seed(0)
    model = TiedModel()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    result = transformed(model, EXACT, (ids,))
    assert result.head.weight is result.embed.weight  # tied, as it was
    assert "tied" in _rows(result)["head.linear"].reason
    with torch.no_grad():
        assert torch.equal(result(ids), model(ids))


class ReadByAHelper(nn.Module):
    """A method the forward calls reads the weight too: out of the forward's sight, so the rewrite fails on
    the example and is taken back, the parameter where it was."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64) / 8)

    def gain(self):
        return self.weight.abs().mean()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return F.linear(x, self.weight) * self.gain()


def test_f_linear_whose_weight_a_helper_reads_is_taken_back():
    torch.manual_seed(0)
    model = ReadByAHelper()
    x = _x(8, 64)
    result = transformed(model, EXACT, (x,))
    assert isinstance(result.weight, nn.Parameter) and "forward" not in vars(result)
    assert not any(isinstance(m, BTTLinear) for m in result.modules())
    assert "AttributeError" in _rows(result)["linear"].reason
    with torch.no_grad():
        assert torch.equal(result(x), model(x))


def test_a_rewritten_forward_survives_saving_and_copying():
    """A saved model is loaded with its rewritten calls (a bound method would pickle as the class's own
    forward: the ReLUs back to F.relu, the F.linear on parameters no longer there)."""
    torch.manual_seed(0)
    model, x = OwnWeights(), _x(8, 64)
    result = transformed(model, [sfx.BTT(rank=2), sfx.MaxPlus(k=2, init="paper")], (x,))
    buffer = io.BytesIO()
    torch.save(result, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        want = result(x)
        assert relative(want, model(x)) > 1e-3  # not the model's function: the check below can fail
        for again in (loaded, copy.deepcopy(result)):
            assert torch.equal(again(x), want) and again.forward.__self__ is again


class ComputedArguments(nn.Module):
    """A ReLU whose inplace is computed and a pool whose window is: left as they are, the ReLU listed."""

    def __init__(self) -> None:
        super().__init__()
        self.inplace, self.window = False, 2

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return F.max_pool2d(F.relu(x, inplace=self.inplace), self.window)


def test_calls_with_computed_arguments_are_kept_and_the_relu_listed():
    model, x = ComputedArguments(), _x(2, 64, 4, 4)
    result = transformed(model, [sfx.MaxPlus(min_features=1), sfx.MaxPlusPool(min_features=1)], (x,))
    assert "forward" not in vars(result) and not list(result.children())
    assert "not a literal" in _rows(result)["<F.relu(x, inplace=self.inplace)>"].reason
    with torch.no_grad():
        assert torch.equal(result(x), model(x))
