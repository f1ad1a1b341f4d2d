"""The catalogue of op cases that every reference, gradient, export and compile test parametrizes over.

A new op or shape is tested everywhere by adding one line to CASES (the habit of CoLA's operator_market).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from structfx.nn import BTTLinear, MaxPlusPool2d, SparseMaxPlus, SPMLinear


def dense_reference(layer: nn.Module, x: Tensor) -> Tensor:
    """``x W^T + b`` with W the layer's materialised dense matrix."""
    y = x @ layer.to_dense().T
    return y if layer.bias is None else y + layer.bias


def brute_force_reference(layer: nn.Module, x: Tensor) -> Tensor:
    return layer.reference(x)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # one input sample, without the batch dim
    reference: Callable[[nn.Module, Tensor], Tensor]

    def make(self) -> nn.Module:
        """The module in float64 with non-trivial parameters (seeded)."""
        torch.manual_seed(0)
        module = self.build().double()
        if isinstance(module, MaxPlusPool2d):
            nn.init.normal_(module.se)  # se = 0 would hide structuring-element bugs
        if isinstance(module, SPMLinear):
            with torch.no_grad():
                module.d_in.uniform_(0.5, 1.5)
                module.d_out.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.normal_()
        if isinstance(module, BTTLinear) and module.bias is not None:
            nn.init.normal_(module.bias)
        return module

    def inputs(self, batch: int, seed: int = 1) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.sample_shape, generator=generator, dtype=torch.float64)


CASES = [
    Case("maxplus_37x23_k3", lambda: SparseMaxPlus(37, 23, k=3), (37,), brute_force_reference),
    Case("maxplus_16x16_relu", lambda: SparseMaxPlus(16, 16, k=2, init="relu"), (16,), brute_force_reference),
    Case("maxplus_13x29_nobias", lambda: SparseMaxPlus(13, 29, k=4, bias=False), (13,), brute_force_reference),
    Case("maxplus_dense_7x5", lambda: SparseMaxPlus(7, 5, k=7), (7,), brute_force_reference),
    Case("spm_orth_37x23", lambda: SPMLinear(37, 23), (37,), dense_reference),
    Case("spm_general_16x31", lambda: SPMLinear(16, 31, variant="general"), (16,), dense_reference),
    Case("spm_random_20x20", lambda: SPMLinear(20, 20, pairing="random"), (20,), dense_reference),
    Case("spm_orth_8x8_2L_nobias", lambda: SPMLinear(8, 8, stages=6, bias=False), (8,), dense_reference),
    Case("btt_r1_36x24", lambda: BTTLinear(36, 24, rank=1), (36,), dense_reference),
    Case("btt_r3_17x13", lambda: BTTLinear(17, 13, rank=3), (17,), dense_reference),
    Case("btt_r2_64x48_nobias", lambda: BTTLinear(64, 48, rank=2, bias=False), (64,), dense_reference),
    Case("pool_3x3_s2_p1_ceil", lambda: MaxPlusPool2d(3, 3, 2, 1, ceil_mode=True), (3, 9, 10),
         brute_force_reference),
    Case("pool_2x3_dil2", lambda: MaxPlusPool2d(2, (2, 3), (1, 2), (1, 0), dilation=2), (2, 7, 8),
         brute_force_reference),
]
