"""What flowed where: every module's calls on the example and calibration inputs, and the inputs of each
candidate node inside a traced graph (with ShapeProp's shapes)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

#: Recorded rows per site are capped: enough to fit and measure a layer, bounded in memory.
MAX_SAMPLE_ELEMENTS = 1 << 22


@dataclass
class Call:
    batch: int  # 0: the example inputs; 1, 2, ...: calibration batches
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """eval() for the duration (no dropout, no BatchNorm statistics updates), then the old modes back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def record_calls(model: nn.Module, batches: list[tuple]) -> tuple[dict[nn.Module, list[Call]], list[object]]:
    """Runs ``model`` on each batch (positional args) with hooks on every module; returns each module's
    calls and the model's outputs (the reference for the whole-model error)."""
    calls: dict[nn.Module, list[Call]] = defaultdict(list)
    current = [0]

    def hook(module, args, kwargs):
        calls[module].append(Call(current[0], _detached(args), _detached(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    outputs = []
    try:
        with torch.no_grad(), evaluation_mode(model):
            for index, batch in enumerate(batches):
                current[0] = index
                outputs.append(model(*batch))
    finally:
        for handle in handles:
            handle.remove()
    return dict(calls), outputs


def _detached(value):
    return torch.utils._pytree.tree_map_only(Tensor, lambda t: t.detach().clone(), value)


def fresh_copies(values: list) -> list:
    """Copies to run a graph on: in-place ops in it must not change the recorded calls."""
    return [_detached(v) for v in values]


def capped(samples: list[Tensor]) -> list[Tensor]:
    """The leading samples, up to MAX_SAMPLE_ELEMENTS elements in all."""
    kept, total = [], 0
    for sample in samples:
        if total >= MAX_SAMPLE_ELEMENTS:
            break
        kept.append(sample)
        total += sample.numel()
    return kept


class SiteInputRecorder(ShapeProp):
    """ShapeProp that also keeps a copy of what flows into each watched node (before any in-place op)."""

    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, fx.Node]) -> None:
        super().__init__(gm)
        self.watched = watched  # site node -> its input node
        self.samples: dict[fx.Node, list[Tensor]] = defaultdict(list)

    def run_node(self, n: fx.Node):
        source = self.watched.get(n)
        if source is not None:
            value = self.env[source]
            if isinstance(value, Tensor) and sum(t.numel() for t in self.samples[n]) < MAX_SAMPLE_ELEMENTS:
                self.samples[n].append(value.detach().clone())
        return super().run_node(n)
