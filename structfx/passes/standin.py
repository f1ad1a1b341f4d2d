"""Stand-ins: how a rewrite is proven before it is kept.

While a region is rewritten, each new layer enters the model as a ``StandIn`` that computes what the
ORIGINAL layer computed (out of place) and carries the replacement beside it. Running the rewritten region
with stand-ins must then give bit for bit the original's outputs (and the same changes to its inputs):
anything else is a fault in how the region was rewired, and the region is left as it was. When every region
is settled, ``materialize`` puts each stand-in's replacement (or, for a revoked one, its original) in place.
"""

from __future__ import annotations

from torch import nn

from structfx.passes.report import Row


class StandIn(nn.Module):
    """Computes ``original`` until ``materialize`` swaps in ``replacement``."""

    def __init__(self, original: nn.Module, replacement: nn.Module, row: Row) -> None:
        super().__init__()
        self.original = original
        self.replacement = replacement
        self.row = row
        self.revoked = False

    def forward(self, *args, **kwargs):
        return self.original(*args, **kwargs)

    def revoke(self, why: str) -> None:
        """Keep the original: the region it sits in could not be proven."""
        if not self.revoked:
            self.revoked = True
            self.row.status, self.row.reason = "skipped", f"not rewritten: {why}"
            self.row.params_new = self.row.ops_new = 0
            self.row.error, self.row.padding = None, ""


def stand_ins(module: nn.Module) -> list[StandIn]:
    return [m for m in module.modules() if isinstance(m, StandIn)]


def materialize(model: nn.Module) -> nn.Module:
    """``model`` with every stand-in replaced by what it stands for (the model itself may be one)."""
    if isinstance(model, StandIn):
        return model.original if model.revoked else model.replacement
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, StandIn):
                parent._modules[name] = child.original if child.revoked else child.replacement
    return model
