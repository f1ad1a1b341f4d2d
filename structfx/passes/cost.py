"""Parameter and operation counts the report compares, old layer against new."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from structfx import registry
from structfx.passes.sites import POOLS, dense_parameters, is_conv1d


@dataclass(frozen=True)
class LayerCost:
    """What a registered op's ``cost(layer)`` returns: multiply-adds per input row (add-max pairs for
    max-plus ops, the window per output for pools) and what the layer padded ("" when nothing)."""

    multiply_adds: int
    padding: str = ""


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ops_per_row(module: nn.Module) -> int:
    """Multiply-adds per input row for dense layers, the registered op's own count for structured layers
    (``OpSpec.cost``), one max per feature for ReLU, the window size per output for pools."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        weight, _ = dense_parameters(module)
        return weight.numel()
    spec = registry.spec_of_layer(module)
    if spec is not None:
        return spec.load("cost")(module).multiply_adds
    if isinstance(module, POOLS):
        kernel = getattr(module, "kernel_size", None)
        return _area(kernel) if kernel is not None else 0  # adaptive: depends on the input
    return 0


def _area(kernel) -> int:
    return kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]


def padding_note(module: nn.Module) -> str:
    """What the new layer padded, for the report ("" when nothing)."""
    spec = registry.spec_of_layer(module)
    return "" if spec is None else spec.load("cost")(module).padding
