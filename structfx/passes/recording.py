"""What flowed where: every module's calls on the example and calibration inputs, and the inputs of each
candidate node inside a traced graph (with ShapeProp's shapes)."""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

#: Recorded rows per site are capped: enough to fit and measure a layer, bounded in memory.
MAX_SAMPLE_ELEMENTS = 1 << 22


#: Calls kept whole (with outputs, to prove rewrites on): the example inputs and this many calibration batches.
PROOF_BATCHES = 3


@dataclass
class Call:
    """One call of a module as recorded in the original model: snapshots of what went in, what came out,
    and what the inputs were after it (an in-place forward changes them)."""

    batch: int  # 0: the example inputs; 1, 2, ...: calibration batches
    args: tuple
    kwargs: dict
    producer: nn.Module | None = None  # the module whose output is args[0], when one is
    output: object = None
    after: tuple | None = None  # (args, kwargs) after the call; None when not kept (see PROOF_BATCHES)

    def fresh(self) -> tuple[tuple, dict]:
        """Copies of the call's arguments to run on: nothing run on them changes the record."""
        return snapshot((self.args, self.kwargs))


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


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Every parameter, buffer and plain tensor attribute of ``model`` as it was on entry, whatever its
    forward writes to them (in place, or by assigning a new tensor to the attribute). An entry taken out of
    its module meanwhile stays out: the tensor keeps its value wherever it went."""
    saved = [
        (table, name, tensor, tensor.detach().clone())
        for module in model.modules()
        for table in (module._parameters, module._buffers, vars(module))
        for name, tensor in table.items()
        if isinstance(tensor, Tensor)
    ]
    try:
        yield model
    finally:
        with torch.no_grad():
            for table, name, tensor, value in saved:
                if name in table:  # one the rewrite moved to a new layer (functional.py) stays there
                    table[name] = tensor
                if tensor.shape != value.shape or not torch.equal(tensor, value):
                    tensor.data = value


def snapshot(value):
    """A deep copy: tensors cloned with the aliasing among them kept, objects (a cache) copied too."""
    try:
        return copy.deepcopy(value)
    except (TypeError, RuntimeError, copy.Error, AttributeError, pickle.PicklingError):
        return torch.utils._pytree.tree_map_only(Tensor, lambda t: t.detach().clone(), value)


def record_calls(model: nn.Module, batches: list[tuple]) -> tuple[dict[nn.Module, list[Call]], list[object]]:
    """Runs ``model`` (eval mode, no grad) on a copy of each batch with hooks on every module; returns each
    module's calls and the model's outputs (the reference for the whole-model error). The batches and the
    model's state are left as they were."""
    return replay(model, [(index, batch, {}) for index, batch in enumerate(batches)])


def replay(model: nn.Module, runs: list[tuple[int, tuple, dict]]) -> tuple[dict[nn.Module, list[Call]], list[object]]:
    """``record_calls`` for calls given as (batch index, args, kwargs)."""
    calls: dict[nn.Module, list[Call]] = defaultdict(list)
    pending: dict[nn.Module, list[Call]] = defaultdict(list)
    producers: dict[int, tuple[Tensor, nn.Module]] = {}
    current = [0]

    def before(module, args, kwargs):
        first = args[0] if args else None
        producer = producers.get(id(first), (None, None))[1] if isinstance(first, Tensor) else None
        call = Call(current[0], snapshot(args), snapshot(kwargs), producer)
        calls[module].append(call)
        pending[module].append(call)

    def after(module, args, kwargs, output):
        call = pending[module].pop()
        if call.batch < PROOF_BATCHES:
            call.output, call.after = snapshot(output), snapshot((args, kwargs))
        if isinstance(output, Tensor):
            producers.setdefault(id(output), (output, module))

    handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(after, with_kwargs=True) for m in model.modules()]
    outputs = []
    try:
        with torch.no_grad(), evaluation_mode(model), preserved_state(model):
            for index, args, kwargs in runs:
                current[0] = index
                producers.clear()
                args, kwargs = snapshot((args, kwargs))
                outputs.append(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return dict(calls), outputs


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
