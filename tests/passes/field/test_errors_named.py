"""Kind 9: every exception leaving transform is a StructfxError that names the place (module path, node)
and the fix, with the cause chained; rule fields are checked against their types on construction."""

import numpy as np
import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, SPMLinear
from tests.passes.field.field_b import MLP, transformed


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, *, x):
        return self.fc(x).relu()


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = MLP()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_keyword_only_forward_is_explained():
    with pytest.raises(sfx.StructfxError, match=r"KeywordOnly.forward cannot take the 1 example_inputs positionally"
                       r".*wrap a keyword-only forward") as caught:
        transformed(KeywordOnly(), sfx.BTT(), (torch.randn(2, 64),))
    assert isinstance(caught.value.__cause__, TypeError)


@pytest.mark.parametrize("value", [None, 2.5, "64", True])
def test_min_features_must_be_an_integer(value):
    with pytest.raises(sfx.StructfxError, match=rf"BTT\(min_features={value!r}\) must be an integer"):
        sfx.BTT(min_features=value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sfx.SPM(fit_steps=-1), r"SPM\(fit_steps=-1\) must be at least 0 \(0 keeps the random init\)"),
        (lambda: sfx.SPM(fit_steps=2.0), r"SPM\(fit_steps=2.0\) must be an integer"),
        (lambda: sfx.SPM(stages=0), r"SPM\(stages=0\) must be at least 1 \(None picks log2 N\)"),
        (lambda: sfx.SPM(progress="no"), r"SPM\(progress='no'\) must be True or False"),
        (lambda: sfx.MaxPlus(k=None), r"MaxPlus\(k=None\) must be an integer"),
        (lambda: sfx.BTT(seed=-1), r"BTT\(seed=-1\) must be at least 0"),
        (lambda: sfx.BTT(init=1), r"BTT\(init=1\) must be one of 'svd', 'random'"),
    ],
)
def test_rule_fields_are_checked_on_construction(make, message):
    with pytest.raises(sfx.StructfxError, match=message):
        make()


def test_fit_steps_zero_is_accepted_and_keeps_the_init():
    result = transformed(MLP(), sfx.SPM(fit_steps=0, progress=False), (torch.randn(4, 64),))
    assert sum(isinstance(m, SPMLinear) for m in result.modules()) == 2


def test_calibration_that_is_not_batches():
    with pytest.raises(sfx.StructfxError, match="calibration must be a tensor or an iterable of batches.*got int"):
        transformed(MLP(), sfx.BTT(), (torch.randn(4, 64),), calibration=5)


def test_numpy_calibration_speaks_of_calibration():
    with pytest.raises(sfx.StructfxError, match=r"calibration is a ndarray: pass torch tensors") as caught:
        transformed(MLP(), sfx.BTT(), (torch.randn(4, 64),), calibration=np.zeros((8, 64), np.float32))
    assert "example_inputs" not in str(caught.value)
    with pytest.raises(sfx.StructfxError, match=r"calibration batch 0 must be a tensor.*got ndarray: convert numpy"):
        transformed(MLP(), sfx.BTT(), (torch.randn(4, 64),), calibration=[np.zeros((8, 64), np.float32)])


def test_numpy_example_inputs_suggest_from_numpy():
    with pytest.raises(sfx.StructfxError, match="example_inputs must be a tensor.*torch.from_numpy"):
        transformed(MLP(), sfx.BTT(), np.zeros((4, 64), np.float32))


def test_a_wrong_example_width_names_the_module_that_failed():
    message = (r"the model fails on example_inputs in module 'body.fc1' \(Linear\): RuntimeError: mat1 and mat2 "
               r"shapes cannot be multiplied")
    with pytest.raises(sfx.StructfxError, match=message) as caught:
        transformed(Nested(), sfx.BTT(), (torch.randn(4, 32),))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_fault_while_converting_names_the_site(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no luck")

    monkeypatch.setattr(BTTLinear, "from_dense", broken)
    with pytest.raises(sfx.StructfxError, match=r"BTT could not convert module 'body.fc1' \(Linear\): RuntimeError: "
                       r"no luck; keep this layer with filter_fn") as caught:
        transformed(Nested(), sfx.BTT(), (torch.randn(4, 64),))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_failing_filter_fn_is_named():
    def picky(name, module):
        raise KeyError(name)

    with pytest.raises(sfx.StructfxError, match=r"filter_fn raised on module 'body.fc1' \(Linear\)") as caught:
        transformed(Nested(), sfx.BTT(), (torch.randn(4, 64),), filter_fn=picky)
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_function_is_not_a_model():
    with pytest.raises(sfx.StructfxError, match=r"transform takes an nn.Module, got function"):
        sfx.transform(lambda t: t, sfx.BTT(), example_inputs=(torch.randn(2, 64),))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_is_refused(bad):
    batch = torch.randn(8, 64)
    batch[3, 5] = bad
    with pytest.raises(sfx.StructfxError, match=r"calibration batch 0, input 0 holds NaN or infinite values"):
        sfx.transform(MLP(), sfx.BTT(), example_inputs=(torch.randn(2, 64),), calibration=[batch])
