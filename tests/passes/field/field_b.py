"""Shared checks of the field tests of issue 15, kinds 7-12: run transform as a user would and hold it to
what it must never do (change the model, its buffers or the user's tensors; raise anything but
StructfxError)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import structfx as sfx


def state(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter and buffer, with each module's mode."""
    copied = {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}
    copied.update({f"{name}.training": torch.tensor(m.training) for name, m in model.named_modules()})
    return copied


def assert_same_state(before: dict[str, Tensor], model: nn.Module) -> None:
    after = state(model)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert value.dtype == after[name].dtype and torch.equal(value, after[name]), f"{name} changed"


def leaves(value) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, Tensor)]


def transformed(model: nn.Module, rules, example_inputs, calibration=None, **kwargs) -> nn.Module:
    """``sfx.transform`` with the model, its buffers and the user's tensors checked unchanged, and any
    exception but StructfxError turned into a test failure."""
    before = state(model)
    given = [t.clone() for t in leaves((example_inputs, calibration))]
    try:
        result = sfx.transform(model, rules, example_inputs, calibration=calibration, **kwargs)
    except sfx.StructfxError:
        raise
    except Exception as e:  # the point of the check: nothing but StructfxError leaves transform
        raise AssertionError(f"transform raised {type(e).__name__}, not StructfxError: {e}") from e
    finally:
        assert_same_state(before, model)
        for old, new in zip(given, leaves((example_inputs, calibration))):
            assert torch.equal(old, new), "transform changed the user's tensors"
    return result


def relative(new: Tensor, old: Tensor) -> float:
    new, old = new.detach().double(), old.detach().double()
    return float((new - old).norm() / old.norm())


class MLP(nn.Module):
    """Linear-ReLU-Linear, 64 wide."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvPool(nn.Module):
    """Conv, ReLU on the feature map, max pool, global max pool, dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.gap(self.pool(self.act(self.conv(x)))).flatten(1))
