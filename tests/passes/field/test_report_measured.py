"""Kind 10: the report claims only what was measured: errors per output (None where no element was
measured), skipped layers apart from parts that fell back, and a row for every part that fell back."""

import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from tests.passes.field.field_b import MLP, relative, transformed
from tests.passes.models import DataDependent, tiny_bert


def test_a_zero_row_calibration_batch_measures_nothing():
    model, x = MLP(), torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    result = transformed(model, sfx.BTT(rank=1), (x,), calibration=[torch.empty(0, 64)])
    report = sfx.report(result)
    assert report.output_errors == {"output": None} and report.model_error is None
    assert len(report.replaced) == 2 and all(row.error is None for row in report.replaced)
    assert "not measured" in report.to_markdown()
    with torch.no_grad():
        assert relative(result(x), model(x)) > 0.1  # what "0" would have hidden


def test_each_output_has_its_own_error():
    model, (ids,) = tiny_bert()
    result = transformed(model, sfx.BTT(rank=1), (ids,))
    report = sfx.report(result)
    with torch.no_grad():
        got, want = result(ids), model(ids)
    expected = {
        "['last_hidden_state']": relative(got.last_hidden_state, want.last_hidden_state),
        "['pooler_output']": relative(got.pooler_output, want.pooler_output),
    }
    assert report.output_errors.keys() == expected.keys()
    for name, error in expected.items():
        assert abs(report.output_errors[name] - error) <= 1e-6 * error
    assert report.model_error == max(expected.values())
    assert report.to_dict()["output_errors"] == report.output_errors


def test_parts_that_fell_back_are_not_counted_as_skipped_layers():
    result = transformed(DataDependent(), [sfx.BTT(rank=2), sfx.MaxPlus(k=2)], (torch.randn(4, 64),))
    report = sfx.report(result)
    assert [row.name for row in report.fell_back] == ["<model>"]
    assert all(row.status == "skipped" for row in report.skipped)
    summary = report.to_markdown().splitlines()[-2]
    counts = f"{len(report.replaced)} replaced, {len(report.skipped)} skipped, 1 fell back (not traced)"
    assert summary.startswith(counts)
    assert report.to_dict()["fell_back"] == 1


class Gate(nn.Module):
    """No children, not traceable: its functional ReLUs are out of reach of a module swap."""

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(x)
        return torch.relu(-x)


def test_a_childless_untraceable_module_is_listed():
    model = nn.Sequential(nn.Linear(64, 64), Gate(), nn.Linear(64, 64))
    result = transformed(model, [sfx.BTT(rank=64), sfx.MaxPlus(k=2)], (torch.randn(4, 64),))
    rows = sfx.report(result).rows
    assert any(row.name == "1" or row.name.startswith("1.") for row in rows), [row.name for row in rows]
    assert {row.name for row in rows if row.status == "replaced"} >= {"0", "2"}
