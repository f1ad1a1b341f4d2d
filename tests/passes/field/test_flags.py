"""Kind 8: nothing that varies between calls is frozen from the example call. Flags (None, bools, strings)
and numbers used in control flow pick the path on every call: a part called with them keeps its own code,
with the replacements swapped in as modules, so later calls with other values run and stay right."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx
from structfx.nn import BTTLinear, ChannelMaxPlus, MaxPlusPool2d, SparseMaxPlus
from tests.passes.field.field_b import leaves, relative, transformed

EXACT = [sfx.BTT(rank=10**6), sfx.MaxPlus(k=2)]


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _module_wise(model: nn.Module, result: nn.Module) -> nn.Module:
    """The original model with each of ``result``'s new layers put in place of the module of that name: the
    reference for rules that are not exact."""
    reference = copy.deepcopy(model)
    names = dict(reference.named_modules())
    for name, module in result.named_modules():
        if isinstance(module, (BTTLinear, SparseMaxPlus)) and name in names:
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, module)
    return reference


def _assert_close(got, want, tolerance: float = 1e-5) -> None:
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want) and len(got) > 0
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert relative(a, b) <= tolerance if a.is_floating_point() else torch.equal(a, b)


class Masked(nn.Module):
    """An optional mask and a bool flag."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x, mask=None, scale: bool = True):
        h = F.relu(self.fc(x))
        if mask is not None:
            h = h * mask
        return h * 2 if scale else h


class Outer(nn.Module):
    """Untraceable at the top, so that ``inner`` is reached on its own, with the example's flags."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Masked()

    def forward(self, x, mask=None, scale: bool = True):
        if x.sum() > 0:
            x = x + 1
        return self.inner(x, mask, scale)


def test_a_mask_that_was_none_in_the_example_is_applied_when_given():
    model, x = Outer(), _x(4, 64)
    result = transformed(model, EXACT, (x,))
    assert isinstance(result.inner.fc, BTTLinear) and _count(result.inner, SparseMaxPlus) == 1
    mask = (_x(4, 64, seed=1) > 0).float()
    with torch.no_grad():
        for args in [(x,), (x, mask), (x, None, False), (x, mask, False), (-x - 3, mask)]:
            _assert_close(result(*args), model(*args))
    row = next(r for r in sfx.report(result).rows if r.name == "inner")
    assert row.status == "fell back" and "mask=None" in row.reason


class Modes(nn.Module):
    """A string flag that picks the path, on a model that traces whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.out = nn.Linear(64, 64)

    def forward(self, x, mode: str = "a"):
        if mode == "a":
            h = F.relu(self.a(x))
        elif mode == "b":
            h = torch.relu(self.b(x)) + self.a(x)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return self.out(h)


@pytest.mark.parametrize("example_mode", ["a", "b"])
def test_a_string_flag_takes_its_own_path_on_every_call(example_mode):
    torch.manual_seed(0)
    model, x = Modes(), _x(8, 64)
    result = transformed(model, EXACT, (x, example_mode))
    assert isinstance(result.a, BTTLinear) and isinstance(result.out, BTTLinear)
    with torch.no_grad():
        for mode in ("a", "b", "a"):
            _assert_close(result(x, mode), model(x, mode))
            _assert_close(result(x, mode=mode), model(x, mode=mode))
        with pytest.raises(ValueError, match="unknown mode"):  # the model's own error, as the model raises it
            result(x, "c")


def test_layers_only_another_flag_reaches_are_replaced_when_calibration_takes_that_path():
    torch.manual_seed(0)
    model, x = Modes(), _x(8, 64)
    alone = transformed(model, EXACT, (x, "a"))
    row = next(r for r in sfx.report(alone).rows if r.name == "b")
    assert type(alone.b) is nn.Linear and "never called" in row.reason
    result = transformed(model, EXACT, (x, "a"), calibration=[(x, "b"), (x, "a")])
    assert isinstance(result.b, BTTLinear) and _count(result, SparseMaxPlus) == 2
    with torch.no_grad():
        for mode in ("a", "b"):
            _assert_close(result(x, mode), model(x, mode))


def test_a_flag_path_runs_the_same_replacements_as_the_model_with_them_swapped_in():
    """Low rank (not exact): the other path computes what the model with the same BTTs put in by name does."""
    torch.manual_seed(0)
    model, x = Modes(), _x(8, 64)
    result = transformed(model, [sfx.BTT(rank=2, seed=0)], (x, "a"))
    reference = _module_wise(model, result)
    assert isinstance(reference.a, BTTLinear) and reference.a is result.a  # one replacement, shared
    with torch.no_grad():
        for mode in ("a", "b"):
            assert torch.equal(result(x, mode), reference(x, mode))
        assert relative(result(x, "b"), model(x, "b")) > 1e-3  # rank 4 is not exact: the check can fail


class Gated(nn.Module):
    """A bool flag given positionally, and an int used in control flow (a number of steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 64)

    def forward(self, x, residual: bool, steps: int):
        for _ in range(steps):
            h = F.relu(self.fc(x))
            x = x + h if residual else h
        return self.head(x)


def test_bool_and_int_flags_in_control_flow():
    torch.manual_seed(0)
    model, x = Gated(), _x(8, 64)
    result = transformed(model, EXACT, (x, True, 1))
    assert isinstance(result.fc, BTTLinear) and _count(result, SparseMaxPlus) == 1
    with torch.no_grad():
        for residual in (True, False):
            for steps in (0, 1, 3):
                _assert_close(result(x, residual, steps), model(x, residual, steps))


class ConvPooled(nn.Module):
    """Functional ReLU and max pool behind a bool flag, on a model that traces whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, pool: bool = True):
        h = F.relu(self.conv(x))
        if pool:
            h = F.max_pool2d(h, 2, stride=2)
        return h.flatten(1)


def test_functional_relus_and_pools_behind_a_flag_are_replaced():
    torch.manual_seed(0)
    model, x = ConvPooled(), _x(2, 3, 8, 8)
    result = transformed(model, [sfx.MaxPlus(min_features=1), sfx.MaxPlusPool(min_features=1)], (x,))
    assert isinstance(result.relu, ChannelMaxPlus) and isinstance(result.pool, MaxPlusPool2d)
    with torch.no_grad():
        for pool in (True, False, True):
            assert torch.equal(result(x, pool), model(x, pool))  # init="relu" and se = 0: bit for bit


class Projected(nn.Module):
    """A bool flag whose other path reaches a layer the example's does not and feeds the ReLU another width."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.act, self.out = nn.Linear(64, 96), nn.ReLU(), nn.Linear(64, 64)

    def forward(self, x, project: bool = False):
        if project:
            return self.act(self.proj(x))
        return self.out(self.act(x))


def test_the_other_value_of_a_bool_flag_is_recorded_at_transform_time():
    torch.manual_seed(0)
    model, x = Projected(), _x(4, 64)
    result = transformed(model, EXACT, (x,))
    assert isinstance(result.proj, BTTLinear) and isinstance(result.out, BTTLinear)
    row = next(r for r in sfx.report(result).rows if r.name == "act")
    assert type(result.act) is nn.ReLU and "different ranks or widths" in row.reason  # not an error at run time
    with torch.no_grad():
        for project in (False, True):
            _assert_close(result(x, project), model(x, project))


class FastPath(nn.Module):
    """Reads its layer's weight on the path its flag's other value takes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x, fast: bool = False):
        if fast:
            return torch.addmm(self.fc.bias, x, self.fc.weight.T)
        return self.fc(x)


def test_a_layer_whose_weight_the_other_flag_path_reads_is_kept():
    torch.manual_seed(0)
    model, x = FastPath(), _x(4, 64)
    result = transformed(model, EXACT, (x,))
    row = next(r for r in sfx.report(result).rows if r.name == "fc")
    assert type(result.fc) is nn.Linear and row.reason.startswith("not rewritten")
    with torch.no_grad():
        for fast in (False, True):
            assert torch.equal(result(x, fast), model(x, fast))


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=32, hidden_act="relu", attn_implementation="eager")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return BertModel(config).eval(), ids


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2, vocab_size=100,
                       max_position_embeddings=64, word_embed_proj_dim=64, attn_implementation="eager")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return OPTForCausalLM(config).eval(), ids


_FLAG_CALLS = [
    {}, {"attention_mask": "mask"}, {"output_attentions": True}, {"output_hidden_states": True},
    {"return_dict": False}, {"attention_mask": "mask", "output_attentions": True, "return_dict": False},
]


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_opt], ids=["bert", "opt"])
def test_transformers_flags_after_an_example_without_them(build):
    model, ids = build()
    result = transformed(model, EXACT, (ids,))
    assert _count(result, BTTLinear) >= 8 and _count(result, SparseMaxPlus) >= 2
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        for flags in _FLAG_CALLS:
            kwargs = {k: mask if v == "mask" else v for k, v in flags.items()}
            got, want = result(ids, **kwargs), model(ids, **kwargs)
            assert type(got) is type(want)
            _assert_close(got, want)


def test_transformed_opt_generates_the_same_greedy_tokens_with_and_without_the_cache():
    model, ids = _tiny_opt()
    result = transformed(model, [sfx.BTT(rank=64), sfx.MaxPlus(k=2)], (ids,))
    prompt = ids[:1]
    with torch.no_grad():
        for use_cache in (False, True):
            want = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache)
            got = result.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache)
            assert torch.equal(got, want)
