"""``structfx.transform``: put structured layers into a copy of a model, on torch.fx graphs.

The whole model is traced when it can be. Where symbolic tracing fails (data-dependent control flow, the
common case in transformers models), each child is traced on its own, recursively, and leaf layers that
no trace reaches are swapped as modules; the report names every part that fell back and why.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from structfx.errors import StructfxError
from structfx.nn.fitting import relative_error
from structfx.passes import cost
from structfx.passes.prefit import filter_keeps, prefit
from structfx.passes.recording import (
    Call,
    SiteInputRecorder,
    capped,
    evaluation_mode,
    fresh_copies,
    record_calls,
)
from structfx.passes.registry import SkipSite, builder_for
from structfx.passes.report import REPORT_ATTRIBUTE, Report, Row, output_errors
from structfx.passes.rewrite import drop_unused_attributes, replace_node
from structfx.passes.rules.base import Rule
from structfx.passes.sites import Site, site_from_module, site_from_node
from structfx.passes.tracing import TraceFailure, bound_arguments, trace_call

FilterFn = Callable[[str, nn.Module], bool]


def transform(
    model: nn.Module,
    rules: Rule | Sequence[Rule],
    example_inputs: Tensor | tuple,
    calibration: Iterable | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """A copy of ``model`` with every layer a rule claims replaced; ``structfx.report(result)`` says what
    changed. ``model`` itself is never modified.

    ``model``: any ``nn.Module``; traced whole with torch.fx where it can be, else child by child.
    ``rules``: one or a list of ``structfx.BTT``, ``SPM``, ``MaxPlus``, ``MaxPlusPool``; when two claim
    a layer, the first wins. ``example_inputs``: the positional inputs of one forward call, a tensor or a
    tuple (e.g. ``(B, n_in)`` float32 for an MLP, ``(B, seq)`` int64 token ids for a transformer); the
    model runs on them to record each layer's inputs, shapes and dtypes. ``calibration``: an iterable of
    batches like ``example_inputs`` with any batch size (a longer tuple such as ``(x, y)`` from a
    labelled loader keeps its first inputs), used to fit the new layers (SPM) and to measure every
    error on; without it, errors are measured on ``example_inputs``. ``filter_fn(name, module)``: False
    keeps that layer (``name`` is its dotted module path).

    Returns an ``nn.Module`` with the same call signature and output structure, in ``model``'s training
    mode, with the report attached. Errors in the report are relative Frobenius norms
    ``||new - old|| / ||old||``; parameters and multiply-adds are counts per layer and per row.

    Replacements take the model's dtype and device; random choices come from each rule's ``seed`` and
    torch's global random state is left as it was. Raises StructfxError, naming the module (and graph
    node) and the fix with the cause chained, for bad arguments (no rules or an unknown one, inputs that
    are not tensors, a calibration batch whose trailing shape or dtype differs from the example's) and
    for any failure while running or rewriting the model.
    """
    rules = _checked_rules(rules)
    example = _as_args(example_inputs, "example_inputs")
    _check_positional_call(model, example)
    batches = [example, *_calibration_batches(calibration, example)]
    with torch.random.fork_rng(devices=_cuda_devices(model)):  # the global RNG is left as it was
        result = copy.deepcopy(model)
        labels = ["example_inputs", *(f"calibration batch {i}" for i in range(len(batches) - 1))]
        calls, reference_outputs = _run_model(record_calls, result, batches, labels, "the model")
        rewriter = _Rewriter(rules, filter_fn, calls, use_calibration=len(batches) > 1)
        try:
            prefit(rules, result, calls, filter_fn, use_calibration=len(batches) > 1)
            result = rewriter.rewrite(result, "")
        except StructfxError:
            raise
        except Exception as e:  # a fault in the rewrite itself: still named, with where it happened
            where = rewriter.rows[-1].name if rewriter.rows else "<model>"
            raise StructfxError(
                f"transform failed while rewriting (last layer visited: {where}): {type(e).__name__}: {e}; "
                f"keep that part out with filter_fn and report the model to structfx"
            ) from e
        measured = batches[1:] or batches
        with torch.no_grad(), evaluation_mode(result):
            outputs, _ = _run_model(_outputs, result, measured, labels[1:] or labels, "the transformed model")
    setattr(result, REPORT_ATTRIBUTE, Report(
        rewriter.rows, output_errors(outputs, reference_outputs[1:] or reference_outputs),
        "calibration inputs" if len(batches) > 1 else "example inputs",
    ))
    return result


def _outputs(model: nn.Module, batches: list[tuple]) -> tuple[list, None]:
    return [model(*batch) for batch in batches], None


def _run_model(run: Callable, model: nn.Module, batches: list[tuple], labels: list[str], what: str):
    """``run(model, batches)``, with the model's own error turned into one that names the module it came
    from and the batch."""
    try:
        return run(model, batches)
    except StructfxError:
        raise
    except Exception as e:
        index, module_name = _failing_call(model, batches)
        raise StructfxError(
            f"{what} fails on {labels[index]} in {module_name}: {type(e).__name__}: {e}. Check that example_inputs "
            f"(and calibration batches) are the positional inputs of one forward call, with the shapes and "
            f"dtypes the model expects"
        ) from e


def _failing_call(model: nn.Module, batches: list[tuple]) -> tuple[int, str]:
    """(batch index, path of the innermost module running) where the model raises: the batches are run
    again with hooks that track which modules have started and not finished."""
    running: list[str] = []
    names = {m: name or f"<model> ({type(m).__name__})" for name, m in model.named_modules()}
    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(lambda m, args: running.append(names[m])))
        handles.append(module.register_forward_hook(lambda m, args, out: running.pop()))
    try:
        with torch.no_grad(), evaluation_mode(model):
            for index, batch in enumerate(batches):
                running.clear()
                try:
                    model(*batch)
                except Exception:
                    return index, running[-1] if running else names[model]
    finally:
        for handle in handles:
            handle.remove()
    return 0, names[model]


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@dataclass
class _Rewriter:
    rules: list[Rule]
    filter_fn: FilterFn | None
    calls: dict[nn.Module, list[Call]]
    use_calibration: bool
    rows: list[Row] = field(default_factory=list)

    def rewrite(self, module: nn.Module, prefix: str) -> nn.Module:
        """The module with its candidates replaced: a GraphModule where it traces, else itself with its
        children rewritten one by one."""
        site = site_from_module(prefix.rstrip("."), module)
        if site is not None:
            calls = self.calls.get(module, [])
            if calls:
                site.input_shape = tuple(calls[0].args[0].shape) if calls[0].args else None
                site.samples = capped([c.args[0] for c in self._sample_calls(calls) if c.args])
            new = self.convert(site)
            return module if new is None else new.train(module.training)
        calls = self.calls.get(module)
        if not calls:
            return self._rewrite_children(module, prefix)
        try:
            gm = trace_call(module, calls[0].args, calls[0].kwargs)
        except TraceFailure as failure:
            self.rows.append(Row(prefix.rstrip(".") or "<model>", "", "fell back", str(failure)))
            return self._rewrite_children(module, prefix)
        self._rewrite_graph(gm, prefix, module, calls)
        gm.training = module.training  # a new GraphModule starts in training mode; its parts keep theirs
        return gm

    def _rewrite_children(self, module: nn.Module, prefix: str) -> nn.Module:
        for name, child in list(module.named_children()):
            setattr(module, name, self.rewrite(child, f"{prefix}{name}."))
        return module

    def _sample_calls(self, calls: list[Call]) -> list[Call]:
        return [c for c in calls if (c.batch > 0) == self.use_calibration]

    def _rewrite_graph(self, gm: fx.GraphModule, prefix: str, module: nn.Module, calls: list[Call]) -> None:
        sites = [site for node in gm.graph.nodes if (site := site_from_node(gm, node, prefix))]
        recorder = SiteInputRecorder(gm, {s.node: s.input_node for s in sites if s.input_node is not None})
        for call in self._sample_calls(calls) or calls[:1]:
            recorder.propagate(*fresh_copies(list(bound_arguments(module, call.args, call.kwargs).values())))
        _name_repeated_calls(sites)
        sites = [s for s in sites if s.input_node is not None]
        for site in sites:
            meta = site.input_node.meta.get("tensor_meta")
            site.input_shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            site.samples = recorder.samples.get(site.node, [])
        replaced: dict[fx.Node, fx.Node] = {}
        for site in sites:
            new = self.convert(site)
            if new is not None:
                site.input_node = replaced.get(site.input_node, site.input_node)
                replaced[site.node] = replace_node(gm, site, new.train(module.training))
        drop_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()

    def convert(self, site: Site) -> nn.Module | None:
        """The replacement for ``site`` under the first rule that claims it, with its report row."""
        rule = next((r for r in self.rules if r.kind == site.kind), None)
        if rule is None:
            return None
        old_params = cost.parameter_count(site.module)
        old_ops = cost.ops_per_row(site.module) if site.kind != "relu" else (site.features or 0)
        row = Row(site.name, type(rule).__name__, "skipped", params_old=old_params, ops_old=old_ops)
        self.rows.append(row)
        if self.filter_fn is not None and not filter_keeps(self.filter_fn, site):
            row.reason = "filter_fn"
            return None
        if site.features is None:
            row.reason = "never called with the example inputs: its size is unknown"
            return None
        if site.features < rule.min_features:
            row.reason = f"{site.features} features < min_features={rule.min_features}"
            return None
        try:
            new = builder_for(rule)(rule, site)
        except SkipSite as skip:
            row.reason = str(skip)
            return None
        except StructfxError:
            raise
        except Exception as e:
            node = "" if site.node is None else f" (node {site.node.name})"
            raise StructfxError(
                f"{type(rule).__name__} could not convert {site.name}{node}: {type(e).__name__}: {e}; "
                f"keep this layer with filter_fn"
            ) from e
        row.status, row.params_new, row.ops_new = "replaced", cost.parameter_count(new), cost.ops_per_row(new)
        row.padding = cost.padding_note(new)
        row.error = _layer_error(site, new)
        return new


def _name_repeated_calls(sites: list[Site]) -> None:
    """A module called at several places gets one row per call: ``name``, ``name:2``, ..."""
    seen: dict[str, int] = {}
    for site in sites:
        seen[site.name] = seen.get(site.name, 0) + 1
        if seen[site.name] > 1:
            site.name = f"{site.name}:{seen[site.name]}"


def _layer_error(site: Site, new: nn.Module) -> float | None:
    if not site.samples:
        return None
    with torch.no_grad(), evaluation_mode(new):
        old_out = torch.cat([site.module(x.clone()).flatten() for x in site.samples])
        new_out = torch.cat([new(x).flatten() for x in site.samples])
    return relative_error(new_out, old_out)


def _checked_rules(rules: Rule | Sequence[Rule]) -> list[Rule]:
    rules = [rules] if not isinstance(rules, (list, tuple)) else list(rules)
    if not rules:
        raise StructfxError("transform needs at least one rule, e.g. [structfx.BTT(rank=1), structfx.MaxPlus(k=2)]")
    for rule in rules:
        builder_for(rule)  # raises, listing the known rules, for anything else
    return rules


def _as_args(inputs, what: str) -> tuple:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(inputs)
    hint = ": convert numpy arrays with torch.from_numpy" if hasattr(inputs, "__array__") else ""
    raise StructfxError(
        f"{what} must be a tensor or a non-empty tuple of a forward call's inputs, got {type(inputs).__name__}{hint}"
    )


def _check_positional_call(model: nn.Module, example: tuple) -> None:
    """transform calls the model as ``model(*example_inputs)``: a forward that cannot take that fails here."""
    try:
        inspect.signature(model.forward).bind(*example)
    except TypeError as e:
        raise StructfxError(
            f"{type(model).__name__}.forward cannot take the {len(example)} example_inputs positionally ({e}); "
            f"transform passes them as model(*example_inputs): wrap a keyword-only forward in a module whose "
            f"forward takes them in order"
        ) from e
    except ValueError:  # no signature to inspect (a builtin): the call itself will tell
        return


def _calibration_batches(calibration: Iterable | None, example: tuple) -> list[tuple]:
    """Each batch as positional args shaped like the example inputs (any batch size)."""
    if calibration is None:
        return []
    if isinstance(calibration, Tensor):
        calibration = [calibration]
    elif hasattr(calibration, "__array__"):
        raise StructfxError(
            f"calibration is a {type(calibration).__name__}: pass torch tensors (torch.from_numpy(array) is one "
            f"batch; a list of tensors or a DataLoader gives several)"
        )
    try:
        batches_in = iter(calibration)
    except TypeError as e:
        raise StructfxError(
            f"calibration must be a tensor or an iterable of batches (a list of tensors or tuples, a DataLoader), "
            f"got {type(calibration).__name__}"
        ) from e
    batches = []
    for index, batch in enumerate(batches_in):
        args = _as_args(batch, f"calibration batch {index}")[: len(example)]
        for position, (got, want) in enumerate(zip(args, example)):
            if not isinstance(want, Tensor):
                continue
            if not isinstance(got, Tensor) or got.shape[1:] != want.shape[1:] or got.dtype != want.dtype:
                described = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, Tensor) else type(got).__name__
                raise StructfxError(
                    f"calibration batch {index}, input {position}: got {described}, expected (any batch, "
                    f"{', '.join(map(str, want.shape[1:]))}) {want.dtype} like example_inputs"
                )
        batches.append(args)
    return batches
