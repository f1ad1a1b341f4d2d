"""Custom ops must not return a view of a tensor they made: autograd forbids changing such an output in
place (``nn.ReLU(inplace=True)`` right after the layer, as in the model it replaced)."""

from __future__ import annotations

from torch import Tensor


def owned(y: Tensor) -> Tensor:
    """``y`` itself when it owns its storage, else a copy that does."""
    return y.clone() if y._is_view() else y
