import pytest
import torch
from torch import nn

import structfx as sfx


def _mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_calibration_of_the_wrong_shape():
    message = r"calibration batch 1, input 0: got \(8, 32\).*expected \(any batch, 64\)"
    with pytest.raises(sfx.StructfxError, match=message):
        sfx.transform(_mlp(), sfx.BTT(), example_inputs=torch.randn(4, 64),
                      calibration=[torch.randn(8, 64), torch.randn(8, 32)])


def test_k_larger_than_the_layer():
    with pytest.raises(sfx.StructfxError, match=r"MaxPlus\(k=80\) exceeds the in_features=64 of module '1' \(ReLU\)"):
        sfx.transform(_mlp(), sfx.MaxPlus(k=80), example_inputs=torch.randn(4, 64))


@pytest.mark.parametrize("rule", ["btt", nn.ReLU(), None])
def test_unknown_rule_lists_the_known_ones(rule):
    with pytest.raises(sfx.StructfxError, match="is not a structfx rule; use one of: BTT, MaxPlus, MaxPlusPool, SPM"):
        sfx.transform(_mlp(), [rule], example_inputs=torch.randn(4, 64))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sfx.BTT(rank=0), r"BTT\(rank=0\) must be at least 1"),
        (lambda: sfx.SPM(variant="lower"), r"SPM\(variant='lower'\) must be one of 'orthogonal', 'general'"),
        (lambda: sfx.MaxPlus(init="zeros"), r"MaxPlus\(init='zeros'\) must be one of 'relu', 'paper'"),
        (lambda: sfx.MaxPlusPool(min_features=0), r"MaxPlusPool\(min_features=0\) must be at least 1"),
    ],
)
def test_rule_configuration_is_validated(make, message):
    with pytest.raises(sfx.StructfxError, match=message):
        make()


def test_report_of_an_untransformed_model():
    with pytest.raises(sfx.StructfxError, match="carries no structfx report"):
        sfx.report(_mlp())


def test_bad_example_inputs():
    with pytest.raises(sfx.StructfxError, match="example_inputs must be a tensor or a non-empty tuple"):
        sfx.transform(_mlp(), sfx.BTT(), example_inputs=())


def test_transforming_a_transformed_model_says_its_layers_are_already_structured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64)
    once = sfx.transform(model, [sfx.BTT(rank=2)], example_inputs=(x,))
    twice = sfx.report(sfx.transform(once, [sfx.BTT(rank=2)], example_inputs=(x,)))
    assert twice.replaced == [] and twice.already_structured == ["0", "2"]
    assert "2 layer(s) already structured before this transform, left as they are (0, 2)" in twice.to_markdown()
    assert "already structured" not in sfx.report(once).to_markdown()


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 16)
        self.register_buffer("cnt", torch.zeros(()))

    def forward(self, x):
        self.cnt += 1
        return torch.relu(self.l(x)) + self.cnt


def test_a_layer_skipped_for_state_its_forward_changes_says_so():
    rules = [sfx.BTT(rank=1000, min_features=1), sfx.MaxPlus(k=2, init="relu", min_features=1)]
    model = Counting().eval()
    result = sfx.transform(model, rules, example_inputs=(torch.randn(2, 16),))
    skipped = {row.name: row.reason for row in sfx.report(result).skipped}
    assert skipped.keys() == {"l", "relu"}
    assert all("its output depends on state its forward changes (buffer cnt)" in why for why in skipped.values())
    assert model.cnt.item() == 0 and result.cnt.item() == 0


def test_a_failing_child_of_nested_sequentials_is_named_by_path_and_class():
    """The hooks that find the failing module returned its name from the forward hook, which replaced each
    module's output with a string: the next module failed instead ("in 1" for a fault in '2.0')."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    with pytest.raises(sfx.StructfxError, match=r"fails on example_inputs in module '2.0' \(Linear\): RuntimeError"):
        sfx.transform(model, sfx.BTT(), example_inputs=torch.randn(2, 8))


def test_a_failing_model_itself_is_named_as_such():
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("no forward")

    with pytest.raises(sfx.StructfxError, match=r"fails on example_inputs in the model itself \(Broken\): ValueError"):
        sfx.transform(Broken(), sfx.BTT(), example_inputs=torch.randn(2, 8))


def test_a_functional_site_is_named_as_a_call():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return torch.relu(self.fc(x))

    with pytest.raises(sfx.StructfxError, match=r"exceeds the in_features=64 of call 'relu' \(relu\)"):
        sfx.transform(Functional(), sfx.MaxPlus(k=80), example_inputs=torch.randn(4, 64))
