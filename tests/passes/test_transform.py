import copy

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, ChannelMaxPlus, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from tests.passes.models import DataDependent, SmallCNN, tiny_bert, tiny_gpt2, tiny_resnet

EXACT_RULES = [sfx.BTT(rank=10**6), sfx.MaxPlus(k=2), sfx.MaxPlusPool()]  # full block rank: exact


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm().detach() / b.norm().detach())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _dense_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


@pytest.mark.parametrize(
    "build, output, kept", [(tiny_bert, "last_hidden_state", []), (tiny_gpt2, "logits", ["lm_head"])]
)
def test_transformers_language_models_function_preserving(build, output, kept):
    model, inputs = build()
    before = _state(model)
    small = sfx.transform(model, EXACT_RULES, example_inputs=inputs)
    assert _dense_layers(small) == kept  # GPT-2's lm_head is tied to the token embedding: kept, and said so
    rows = {row.name: row for row in sfx.report(small).rows}
    assert all("tied" in rows[name].reason for name in kept)
    relus = [m for m in small.modules() if isinstance(m, nn.ReLU)]
    assert relus == [] and any(isinstance(m, SparseMaxPlus) for m in small.modules())
    assert _relative(getattr(small(*inputs), output), getattr(model(*inputs), output)) < 1e-4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = sfx.report(small)
    assert len(report.replaced) > 0 and report.model_error < 1e-4


def test_transformers_resnet_relus_and_pools():
    model, inputs = tiny_resnet()
    small = sfx.transform(model, [sfx.MaxPlus(min_features=1), sfx.MaxPlusPool(min_features=1)], example_inputs=inputs)
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in small.modules())
    assert any(isinstance(m, ChannelMaxPlus) for m in small.modules())
    # the adaptive average pool has no fixed-window equivalent at every input size: kept, and said so
    assert isinstance(small.pooler, nn.AdaptiveAvgPool2d)
    assert "adaptive pool" in {row.name: row for row in sfx.report(small).rows}["pooler"].reason
    assert all(row.error < 1e-6 for row in sfx.report(small).replaced)
    for got, want in zip(small(*inputs).values(), model(*inputs).values()):
        assert torch.equal(got, want)  # init="relu" and se = 0 are exact, bit for bit


def test_data_dependent_model_falls_back_and_rewrites_traceable_parts():
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(16, 64)
    small = sfx.transform(model, [sfx.BTT(rank=10**6), sfx.MaxPlus(k=2)], example_inputs=(x,))
    report = sfx.report(small)
    fell_back = [row for row in report.rows if row.status == "fell back"]
    assert [row.name for row in fell_back] == ["<model>"]
    assert "control flow" in fell_back[0].reason
    replaced = {row.name for row in report.replaced}
    for block in ("first", "second"):  # F.relu, torch.relu, x.relu(), relu_ and F.linear inside each block
        assert {f"{block}.up", f"{block}.relu", f"{block}.relu_1", f"{block}.relu_2", f"{block}.linear",
                f"{block}.relu_"} <= replaced
    assert isinstance(small.first, torch.fx.GraphModule)
    assert not any(isinstance(p, nn.Parameter) and p.shape == (64, 128) for p in small.first.parameters())
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert "head" in {row.name for row in report.skipped}  # 10 outputs < min_features


def test_a_model_in_training_mode_is_traced_and_stays_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.ReLU()).train()
    small = sfx.transform(model, [sfx.BTT(rank=10**6), sfx.MaxPlus()], example_inputs=torch.randn(8, 64))
    assert isinstance(small, torch.fx.GraphModule)  # dropout did not make the traced graph look different
    assert small.training and all(m.training for m in small.modules())
    assert len(sfx.report(small).replaced) == 2


def test_cnn_functional_pools_and_feature_map_relus():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(4, 3, 16, 16)
    small = sfx.transform(model, [sfx.MaxPlus(min_features=1), sfx.MaxPlusPool(min_features=1)], example_inputs=(x,))
    assert isinstance(small, torch.fx.GraphModule)
    kinds = [type(m) for m in small.modules()]
    assert kinds.count(MaxPlusPool2d) == 3 and kinds.count(ChannelMaxPlus) == 2
    assert torch.equal(small(x), model(x))


def test_filter_fn_min_features_and_rule_order():
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(8, 64)
    seen = []

    def keep_first_only(name, module):
        seen.append((name, type(module).__name__))
        return name.startswith("first.")

    small = sfx.transform(model, [sfx.SPM(fit_steps=0), sfx.BTT()], example_inputs=(x,), filter_fn=keep_first_only)
    rows = {row.name: row for row in sfx.report(small).rows}
    assert rows["first.up"].rule == "SPM" and rows["first.up"].status == "replaced"
    assert rows["second.up"].reason == "filter_fn" and isinstance(small.second.up, nn.Linear)
    assert ("first.linear", "Linear") in seen  # functional forms reach filter_fn as their module equivalent
    small = sfx.transform(model, [sfx.BTT(min_features=65)], example_inputs=(x,))
    assert sfx.report(small).replaced == []
    assert "64 features < min_features=65" in {row.reason for row in sfx.report(small).rows}


@pytest.mark.parametrize("init", ["svd", "random"])
def test_a_lossy_btt_that_saves_nothing_is_skipped_and_said_so(init):
    # 64 x 64 in 8 x 8 blocks: rank 4 takes 4 * (8 * 64 + 8 * 64) = 4096 multiply-adds a row, the dense
    # layer's 64 * 64; rank 2 halves it; rank 8 is the blocks' full rank, exact, and kept as asked
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 256)).eval()
    x = torch.randn(8, 64)

    def rows(rank):
        small = sfx.transform(model, sfx.BTT(rank=rank, init=init), example_inputs=x)
        return {row.name: row for row in sfx.report(small).rows}

    at_4 = rows(4)
    assert at_4["0"].status == "skipped"
    assert "4096 multiply-adds a row here, no fewer than the dense layer's 4096" in at_4["0"].reason
    assert at_4["2"].status == "replaced"  # 64 -> 256 at rank 4 saves a quarter
    for rank in (2, 8):
        assert {row.status for row in rows(rank).values()} == {"replaced"}


def test_nothing_to_replace_is_an_empty_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh())
    small = sfx.transform(model, sfx.MaxPlus(), example_inputs=torch.randn(1, 3, 8, 8))
    assert sfx.report(small).replaced == [] and sfx.report(small).rows == []


def test_calibration_is_used_for_fitting_and_measuring():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    batches = [(torch.randn(32, 64), torch.zeros(32)) for _ in range(3)]  # (x, label) like a DataLoader
    small = sfx.transform(model, sfx.SPM(fit_steps=20), example_inputs=torch.randn(4, 64), calibration=batches)
    report = sfx.report(small)
    assert report.measured_on == "calibration inputs" and len(report.replaced) == 2
    assert sum(isinstance(m, SPMLinear) for m in small.modules()) == 2


def test_transformed_model_exports_and_trains():
    model, inputs = tiny_bert()
    small = sfx.transform(model, [sfx.BTT(rank=2), sfx.MaxPlus(k=2)], example_inputs=inputs)
    exported = torch.export.export(small, inputs, strict=False)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"structfx.btt.default", "structfx.sparse_maxplus.default"} <= targets
    small.train()
    out = small(*inputs)
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    assert all(p.grad is not None for m in small.modules() if isinstance(m, BTTLinear) for p in m.parameters())


def test_input_model_is_never_modified():
    torch.manual_seed(0)
    model = DataDependent()
    snapshot = copy.deepcopy(model)
    sfx.transform(model, [sfx.SPM(fit_steps=5), sfx.MaxPlus()], example_inputs=torch.randn(8, 64))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.state_dict().values()))
    assert [type(m) for m in model.modules()] == [type(m) for m in snapshot.modules()]
