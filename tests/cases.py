"""The catalogue of op cases that every reference, gradient, export and compile test parametrizes over.

Each registered op brings its cases (``structfx.registry.OpSpec.cases``), so a new op or shape is tested
everywhere by one line in its registration (the habit of CoLA's operator_market).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from structfx import registry


def dense_reference(layer: nn.Module, x: Tensor) -> Tensor:
    """``x W^T + b`` with W the layer's materialised dense matrix."""
    y = x @ layer.to_dense().T
    return y if layer.bias is None else y + layer.bias


@dataclass(frozen=True)
class Case:
    """One ``OpCase`` of a registered op."""

    spec: registry.OpSpec
    case: registry.OpCase

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.case.sample_shape

    def make(self) -> nn.Module:
        """The op's first layer in float64, the case's ``redraw`` parameters drawn again (seeded)."""
        torch.manual_seed(0)
        module = self.spec.load("layers")[0](*self.case.args, **self.case.kwargs).double()
        state = dict(module.named_parameters()) | dict(module.named_buffers())
        with torch.no_grad():
            for name, (low, high) in self.case.redraw.items():
                if state.get(name) is not None:
                    state[name].uniform_(low, high)
        return module

    def inputs(self, batch: int, seed: int = 1) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.sample_shape, generator=generator, dtype=torch.float64)

    @staticmethod
    def reference(layer: nn.Module, x: Tensor) -> Tensor:
        """The layer's brute-force ``reference`` where it has one, else its dense matrix."""
        return layer.reference(x) if hasattr(layer, "reference") else dense_reference(layer, x)


def cases() -> list[Case]:
    """The cases of every op registered now."""
    return [Case(spec, case) for spec in registry.specs() for case in spec.cases]


CASES = cases()
