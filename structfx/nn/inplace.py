"""``InPlace(layer)``: a layer that writes its result into its input, as ``nn.ReLU(inplace=True)`` does.

What replaces an in-place ReLU where its caller may read the mutated tensor through another name (a view,
the same tensor passed on): ``x.copy_(layer(x.clone()))`` changes ``x`` and every alias of it, and the
clone keeps what ``layer`` saved for backward from being overwritten.
"""

from __future__ import annotations

from torch import Tensor, nn


class InPlace(nn.Module):
    """``x -> x.copy_(layer(x))``, returning ``x``; ``layer`` must keep the shape of its input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return x.copy_(self.layer(x.clone()))
