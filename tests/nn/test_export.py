"""The layers survive torch.export as ONE structfx node each, and run under torch.compile."""

import pytest
import torch
from torch import nn

from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from tests.cases import CASES


def _structfx_targets(exported) -> list[str]:
    return [
        str(node.target)
        for node in exported.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("structfx.")
    ]


def test_export_keeps_one_node_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(BTTLinear(256, 256), SparseMaxPlus(256, 256), SPMLinear(256, 256))
    exported = torch.export.export(model, (torch.randn(4, 256),))
    assert _structfx_targets(exported) == [
        "structfx.btt.default",
        "structfx.sparse_maxplus.default",
        "structfx.spm.default",
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_case_exports_as_the_custom_op_its_registration_names(case):
    """The registration's ``custom_op`` (what the converter is keyed by) is the op the layer calls."""
    exported = torch.export.export(case.make().float(), (case.inputs(3).float(),))
    assert _structfx_targets(exported) == [case.spec.custom_op.replace("::", ".") + ".default"]


def test_export_pool_and_symbolic_batch():
    model = nn.Sequential(MaxPlusPool2d(3, 2), nn.Flatten(), SPMLinear(12, 5))
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (torch.randn(2, 3, 4, 4),), dynamic_shapes=({0: batch},))
    assert _structfx_targets(exported) == ["structfx.maxplus_pool2d.default", "structfx.spm.default"]
    x = torch.randn(7, 3, 4, 4)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_torch_compile_forward_and_backward():
    torch.manual_seed(0)
    model = nn.Sequential(BTTLinear(24, 32, rank=2), SparseMaxPlus(32, 32, k=2), SPMLinear(32, 16, variant="general"))
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(5, 24)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for got, want in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)
