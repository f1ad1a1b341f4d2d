"""The op registry: a toy op registered in one place is found by transform, the report, compile and the CLI.

The toy op ``ShiftedFloor`` computes ``y[..., j] = max(x[..., j] + shift[j], floor[j])`` (exactly ReLU at
its init, shift = floor = 0). Its layer, custom op, rule, builder, cost, TE kernel, converter, schedule
rule and test case are written below as a new op's files would be, and ``register_op`` ties them; the
fixture removes it again, so the rest of the suite sees the built-in ops only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

import structfx as sfx
from structfx import registry
from structfx.cli import app
from structfx.errors import StructfxError
from structfx.lowering.compat import Schedule, Target, te, tirx
from structfx.lowering.ops.common import OpScheduleRule, as_rows, find_block, from_rows
from structfx.lowering.schedules import schedule_rules_for
from structfx.passes.cost import LayerCost
from structfx.passes.registry import SkipSite
from structfx.passes.rules.base import Rule
from structfx.passes.rules.placement import placed
from structfx.passes.rules.spec import parse_rules
from structfx.passes.sites import Site
from structfx.passes.tracing import StructfxTracer
from tests.cases import Case

# --- the layer and its custom op (structfx/nn/<op>.py) ---


@torch.library.custom_op("structfx::toy_shifted_floor", mutates_args=())
def shifted_floor(x: Tensor, shift: Tensor, floor: Tensor) -> Tensor:
    return torch.maximum(x + shift, floor)


@shifted_floor.register_fake
def _(x, shift, floor):
    return torch.empty_like(x)


class ShiftedFloor(nn.Module):
    """x (..., features) -> max(x + shift, floor), elementwise over the last dim."""

    channel_dim: ClassVar[int] = -1

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.shift = nn.Parameter(torch.zeros(features))
        self.floor = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> Tensor:
        return shifted_floor(x, self.shift, self.floor)

    def reference(self, x: Tensor) -> Tensor:
        return torch.maximum(x + self.shift, self.floor)


# --- the rule, its builder and its cost (structfx/passes/rules/<op>.py) ---


@dataclass(frozen=True)
class ToyFloor(Rule):
    """ReLU -> ShiftedFloor."""

    kind: ClassVar = "relu"


def relu_to_floor(rule: ToyFloor, site: Site) -> nn.Module:
    shape = site.input_shape
    if shape is None or site.channel_axis not in (None, len(shape) - 1):
        raise SkipSite("channels not on the last dim")
    return placed(ShiftedFloor(site.features), site)


def floor_cost(layer: ShiftedFloor) -> LayerCost:
    return LayerCost(2 * layer.features)  # an add and a max per feature


# --- its kernel, converter and schedule rule (structfx/lowering/ops/<op>.py) ---

BLOCK = "structfx_toy_shifted_floor"


def floor_te(x: te.Tensor, shift: te.Tensor, floor: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda b, j: tirx.max(x[b, j] + shift[j], floor[j]), name=BLOCK)


def convert_floor(node, importer, target: Target):
    x, shift, floor = (importer.env[a] for a in node.args)
    rows, leading = as_rows(importer, x)
    y = importer.block_builder.emit_te(floor_te, rows, shift, floor, primfunc_name_hint=BLOCK)
    return from_rows(importer, y, leading, importer.shape_of(shift)[0])


class FloorCPU(OpScheduleRule):
    """Rows in parallel, features vectorised."""

    scheduled: ClassVar[int] = 0  # how often this rule scheduled a kernel, for the test

    def schedule(self, sch: Schedule, target: Target, tunable: bool) -> bool:
        block = find_block(sch, BLOCK)
        if block is None:
            return False
        rows, features = sch.get_loops(block)
        sch.parallel(rows)
        FloorCPU.scheduled += 1
        return True


# --- the registration: the one place that ties the parts ---

TOY = registry.OpSpec(
    name="toy_floor",
    custom_op="structfx::toy_shifted_floor",
    layers=(ShiftedFloor,),
    rule=ToyFloor,
    build=relu_to_floor,
    cost=floor_cost,
    converter=convert_floor,
    schedules=(FloorCPU,),
    cases=(registry.OpCase("toy_floor_20", (20,), {}, (20,), {"shift": (-1.0, 1.0), "floor": (-1.0, 1.0)}),),
)


@pytest.fixture
def toy():
    registry.register_op(TOY)
    try:
        yield TOY
    finally:
        registry.unregister_op(TOY.name)


def _mlp() -> tuple[nn.Module, tuple[Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 96), nn.ReLU(), nn.Linear(96, 4)).eval()
    return model, (torch.randn(8, 16),)


def test_transform_and_report_use_the_registration(toy):
    model, inputs = _mlp()
    small = sfx.transform(model, [sfx.SPM(fit_steps=0), ToyFloor()], example_inputs=inputs)
    (layer,) = [m for m in small.modules() if isinstance(m, ShiftedFloor)]
    row = next(r for r in sfx.report(small).rows if r.rule == "ToyFloor")
    assert (row.status, row.params_old, row.params_new) == ("replaced", 0, 2 * 96)
    assert (row.ops_old, row.ops_new) == (96, 2 * 96)  # the toy's own cost
    assert row.error == 0.0  # exactly ReLU at its init
    assert StructfxTracer().is_leaf_module(layer, "toy")
    assert sfx.ToyFloor is ToyFloor and sfx.nn.ShiftedFloor is ShiftedFloor and sfx.passes.ToyFloor is ToyFloor


def test_compile_uses_the_converter_and_the_schedule_rule(toy):
    model, inputs = _mlp()
    small = sfx.transform(model, [ToyFloor()], example_inputs=inputs)
    (layer,) = [m for m in small.modules() if isinstance(m, ShiftedFloor)]
    with torch.no_grad():
        layer.shift.uniform_(-1, 1)
        layer.floor.uniform_(-1, 1)
    before = FloorCPU.scheduled
    compiled = sfx.compile(small, inputs)
    assert BLOCK in compiled.kernels and FloorCPU.scheduled > before
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), small(x), rtol=1e-5, atol=1e-5)


def test_the_case_runs_against_its_reference(toy):
    (case,) = [Case(toy, c) for c in toy.cases]
    layer = case.make()
    assert layer.shift.abs().sum() > 0  # the case's redraw took effect
    x = case.inputs(6)
    torch.testing.assert_close(layer(x), case.reference(layer, x), rtol=1e-12, atol=1e-12)


def test_the_cli_parses_and_lists_it(toy, tmp_path):
    assert parse_rules("toy_floor:min_features=8") == [ToyFloor(min_features=8)]
    runner = CliRunner()
    unknown = runner.invoke(app, ["compile", "examples/models.py:mlp", "--rules", "nothing", "--out", "x"])
    assert unknown.exit_code == 2 and "toy_floor" in unknown.output
    out = tmp_path / "mlp.sfx"
    result = runner.invoke(app, ["compile", "examples/models.py:mlp", "--rules", "toy_floor", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| ToyFloor | replaced |" in result.output and f"saved {out}" in result.output


def test_unregistered_it_is_gone_everywhere():
    registry.register_op(TOY)
    registry.unregister_op(TOY.name)
    assert TOY not in registry.specs()
    assert ShiftedFloor not in registry.layer_types()
    assert not hasattr(sfx, "ToyFloor") and not hasattr(sfx.nn, "ShiftedFloor")
    assert FloorCPU not in {type(rule) for rule in schedule_rules_for(Target({"kind": "llvm"}))}
    with pytest.raises(StructfxError, match="unknown rule 'toy_floor'; use one of: maxplus, maxplus_pool, spm, btt"):
        parse_rules("toy_floor")
    with pytest.raises(StructfxError, match="is not a structfx rule"):
        sfx.transform(nn.Sequential(nn.ReLU()), [ToyFloor()], example_inputs=(torch.randn(2, 4),))


def test_a_name_or_custom_op_registered_twice_is_refused():
    with pytest.raises(StructfxError, match="clashes with the registered op 'btt'"):
        registry.register_op(registry.OpSpec(**{**vars(TOY), "name": "btt"}))
    with pytest.raises(StructfxError, match="clashes with the registered op 'spm'"):
        registry.register_op(registry.OpSpec(**{**vars(TOY), "custom_op": "other::spm"}))
    with pytest.raises(StructfxError, match="clashes with the registered op 'btt'"):
        registry.register_op(registry.OpSpec(**{**vars(TOY), "layers": ("mine:BTTLinear",)}))
    assert TOY not in registry.specs()


def test_every_built_in_part_resolves():
    """The built-in registrations name parts that exist (a misspelt path fails here, not in a user's run)."""
    parts = ("layers", "rule", "build", "cost", "converter", "schedules", "prefit")
    for spec in registry.specs():
        for part in parts:
            assert spec.load(part) is not None or part == "prefit"
        assert all(issubclass(rule, OpScheduleRule) for rule in spec.load("schedules"))
        assert {rule.target_kind for rule in spec.load("schedules")} == {"llvm", "cuda"}


@pytest.mark.parametrize("change, message", [
    ({"name": "Toy-Floor"}, "must be a lower-case identifier"),
    ({"custom_op": "toy_floor"}, "is not 'namespace::name'"),
    ({"cases": ()}, "needs at least one layer and one test case"),
])
def test_a_malformed_registration_is_refused(change, message):
    with pytest.raises(StructfxError, match=message):
        registry.OpSpec(**{**vars(TOY), **change})


def test_a_misspelt_part_names_itself():
    spec = registry.OpSpec(**{**vars(TOY), "cost": "structfx.passes.rules.btt:no_such_cost"})
    with pytest.raises(StructfxError, match="toy_floor.cost: cannot import 'structfx.passes.rules.btt:no_such_cost'"):
        spec.load("cost")


def test_a_mistyped_field_is_named_with_the_field_it_resembles():
    with pytest.raises(StructfxError, match="btt: unknown field 'rnk'; did you mean 'rank'\\? fields: .*rank"):
        parse_rules("btt:rnk=2")
    with pytest.raises(StructfxError, match="btt: 'rank' is not FIELD=VALUE"):
        parse_rules("btt:rank")
    with pytest.raises(StructfxError, match="maxplus: unknown field 'width'; fields: "):
        parse_rules("maxplus:width=3")
