"""Issue #15 on transformers architectures (tiny configs): no crash, exact with the exact rules, and every
module transform did not replace anything in keeps its type and its attributes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structfx as sfx
from tests.passes.field.harness import relative_error, transformed
from tests.passes.field.zoo import ZOO


def _untouched(model: nn.Module, small: nn.Module) -> list[str]:
    """Names of the modules with no replaced layer at or below them, checked to keep type and attributes."""
    replaced = [row.name for row in sfx.report(small).replaced]
    checked = []
    for name, module in model.named_modules():
        if any(r == name or r.startswith(f"{name}.") or not name for r in replaced):
            continue
        mine = small.get_submodule(name)
        assert type(mine) is type(module), name
        plain = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, tuple))}
        assert {k: getattr(mine, k) for k in plain} == plain, name
        checked.append(name)
    return checked


@pytest.mark.parametrize("build", ZOO, ids=[build.__name__ for build in ZOO])
def test_zoo_transforms_exactly_and_leaves_the_rest_alone(build):
    torch.manual_seed(0)
    model, inputs = build()
    small = transformed(model, [inputs])
    with torch.no_grad():
        got, want = small(*inputs), model(*inputs)
    for key in want.keys():
        if isinstance(want[key], torch.Tensor) and want[key].is_floating_point():
            assert relative_error(got[key], want[key]) < 1e-4, key
    assert len(_untouched(model, small)) > 0
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert sum(isinstance(m, nn.Embedding) for m in small.modules()) == len(embeddings)


def test_opt_keeps_its_embeddings_and_tied_head():
    from tests.passes.field.zoo import tiny_opt

    model, inputs = tiny_opt()
    small = transformed(model, [inputs])
    assert type(small.get_input_embeddings()) is nn.Embedding
    assert small.lm_head.weight is small.get_input_embeddings().weight
    norms = [m for name, m in small.named_modules() if "layer_norm" in name.split(".")[-1]]
    assert len(norms) == 5 and all(type(m) is nn.LayerNorm for m in norms)
    small.resize_token_embeddings(120)
    assert small.get_input_embeddings().num_embeddings == 120
