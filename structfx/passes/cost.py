"""Parameter and operation counts the report compares, old layer against new."""

from __future__ import annotations

from torch import nn

from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear
from structfx.passes.sites import POOLS, dense_parameters, is_conv1d


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ops_per_row(module: nn.Module) -> int:
    """Multiply-adds per input row for dense layers (SPM: 2 N L; BTT: r (n0 n_in + m1 n_out)), add-max
    pairs per feature vector for max-plus (k per output), one max per feature for ReLU, the window size
    per output for pools."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        weight, _ = dense_parameters(module)
        return weight.numel()
    if isinstance(module, BTTLinear):
        m0, m1, n0, n1 = module.blocks
        return module.rank * (n0 * module.padded_in + m1 * module.padded_out)
    if isinstance(module, SPMLinear):
        return 2 * module.width * module.stages
    if isinstance(module, SparseMaxPlus):
        return module.k * module.out_features
    if isinstance(module, MaxPlusPool2d):
        return module.se[0].numel()
    if isinstance(module, POOLS):
        kernel = getattr(module, "kernel_size", None)
        return _area(kernel) if kernel is not None else 0  # adaptive: depends on the input
    return 0


def _area(kernel) -> int:
    return kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]


def padding_note(module: nn.Module) -> str:
    """What the new layer padded, for the report ("" when nothing)."""
    if isinstance(module, BTTLinear):
        notes = []
        if module.padded_in != module.in_features:
            notes.append(f"in {module.in_features}->{module.padded_in}")
        if module.padded_out != module.out_features:
            notes.append(f"out {module.out_features}->{module.padded_out}")
        return ", ".join(notes)
    if isinstance(module, SPMLinear) and module.width != max(module.in_features, module.out_features):
        return f"width {max(module.in_features, module.out_features)}->{module.width}"
    return ""
