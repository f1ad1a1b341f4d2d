"""Pools with one output along a dimension whose window reaches past the padded input (a global pool
written as ``AvgPool2d(640, ceil_mode=True)``, transformers' EfficientNet) are clipped to the input before
TVM imports them (structfx/lowering/pool_windows.py): the rewritten arguments, and numerics against torch
at odd sizes, batch 1 and a symbolic batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.lowering.graph_fixes import prepare_for_import
from structfx.lowering.pool_windows import clip_pool_windows

aten = torch.ops.aten

POOLS = {
    "global-avg-ceil": (nn.AvgPool2d(640, ceil_mode=True), (5, 3, 3)),
    "padded-avg": (nn.AvgPool2d(7, padding=1, ceil_mode=True), (5, 3, 5)),
    "one-dim-of-several-outputs": (nn.AvgPool2d((4, 2), stride=(4, 1), ceil_mode=True), (5, 3, 5)),
    "avg-without-padding-in-divisor": (nn.AvgPool2d(8, padding=2, ceil_mode=True, count_include_pad=False),
                                       (5, 3, 5)),
    "max": (nn.MaxPool2d(101, padding=1, ceil_mode=True), (5, 3, 5)),
    "avg-1d": (nn.AvgPool1d(50, ceil_mode=True), (5, 7)),
}


def _model(pool: nn.Module, channels: int, rank: int) -> nn.Module:
    conv = nn.Conv2d(channels, channels, 1) if rank == 2 else nn.Conv1d(channels, channels, 1)
    return nn.Sequential(conv, pool).eval()


def _pool_nodes(pool: nn.Module, shape: tuple) -> list:
    program = torch.export.export(_model(pool, shape[0], len(shape) - 1), (torch.randn(2, *shape),))
    program = prepare_for_import(program)
    clip_pool_windows(program.graph_module)
    return [n for n in program.graph_module.graph.nodes if "pool" in str(n.target)]


def test_a_global_pool_window_is_clipped_to_the_input():
    (node,) = _pool_nodes(nn.AvgPool2d(640, ceil_mode=True), (5, 3, 4))
    assert node.target is aten.avg_pool2d.default
    kernel, stride = node.args[1:3]
    assert list(kernel) == [3, 4] and list(stride) == [3, 4]
    assert node.args[4] is False


def test_only_the_dimension_with_one_output_is_clipped():
    (node,) = _pool_nodes(nn.AvgPool2d((4, 2), stride=(4, 1), ceil_mode=True), (5, 3, 5))
    assert list(node.args[1]) == [3, 2] and list(node.args[2]) == [3, 1] and node.args[4] is True


def test_windows_inside_the_input_are_left_alone():
    (node,) = _pool_nodes(nn.AvgPool2d(3, stride=2, ceil_mode=True), (5, 7, 7))
    assert list(node.args[1]) == [3, 3] and list(node.args[2]) == [2, 2]


@pytest.mark.parametrize("name", sorted(POOLS))
def test_clipped_pools_match_torch_at_any_batch(name):
    """Compiled at batch 3 (symbolic batch), run at batch 1 and 4."""
    pool, shape = POOLS[name]
    model = _model(pool, shape[0], len(shape) - 1)
    compiled = sfx.compile(model, torch.randn(3, *shape))
    for batch in (1, 4):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (name, batch)
