"""``structfx.transform``: put structured layers into a copy of a model, on torch.fx graphs.

The whole model is traced when it can be. Where symbolic tracing fails (data-dependent control flow, the
common case in transformers models) or is not tried (a part called with flags, tracing.py), each child is
traced on its own, recursively, and leaf layers that no trace reaches are swapped as modules (ReLU,
F.linear and pool calls in such a forward made modules first: functional.py);
the report names every part that fell back and why. Every rewritten region is proven to compute what it
did, bit for bit, with stand-ins of the original layers (standin.py, proof.py), or left as it was.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from structfx import registry
from structfx.errors import StructfxError, module_place, require_module
from structfx.nn import InPlace
from structfx.nn.fitting import relative_error
from structfx.passes import cost
from structfx.passes.axes import axis_of_module_output, channel_axis, resolved_axis
from structfx.passes.functional import Rewritten, calls_as_modules
from structfx.passes.keep import (
    direct_reads,
    owner_problem,
    parameter_names,
    shape_problem,
    tie_problem,
    weight_read_problem,
)
from structfx.passes.prefit import filter_keeps, prefit
from structfx.passes.proof import disproof
from structfx.passes.recording import (
    Call,
    SiteInputRecorder,
    capped,
    evaluation_mode,
    preserved_state,
    record_calls,
    replay,
    snapshot,
)
from structfx.passes.registry import SkipSite, builder_for
from structfx.passes.report import REPORT_ATTRIBUTE, Report, Row, output_errors
from structfx.passes.rewrite import drop_unused_attributes, replace_node, unique_attribute
from structfx.passes.rules.base import Rule
from structfx.passes.sites import Site, site_from_module, site_from_node
from structfx.passes.standin import StandIn, materialize, stand_ins
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
    error on; without it, errors are measured on ``example_inputs``. Nothing is frozen from these calls:
    tensors and numbers stay inputs of the traced graphs, and a part called with flags (``mask=None``, a
    bool, a mode string) keeps its own code with the replacements swapped in as modules, so later calls
    with other values take their own paths; a layer only another value reaches is replaced when some
    batch (which may carry that value in place of the example's) takes that path. ``filter_fn(name, module)``: False
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
    require_module(model, "transform")
    rules = _checked_rules(rules)
    example = _as_args(example_inputs, "example_inputs")
    _check_positional_call(model, example)
    batches = [example, *_calibration_batches(calibration, example)]
    structured = [name for name, m in model.named_modules() if isinstance(m, registry.layer_types())]
    with torch.random.fork_rng(devices=_cuda_devices(model)):  # the global RNG is left as it was
        result = copy.deepcopy(model)
        labels = ["example_inputs", *(f"calibration batch {i}" for i in range(len(batches) - 1))]
        with preserved_state(result):
            calls, reference_outputs = _run_model(record_calls, result, batches, labels, "the model")
            rewriter = _Rewriter(rules, filter_fn, calls, len(batches) > 1, parameter_names(result))
            try:
                prefit(rules, result, calls, filter_fn, use_calibration=len(batches) > 1)
                result = materialize(rewriter.rewrite(result, ""))
            except StructfxError:
                raise
            except Exception as e:  # a fault in the rewrite itself: still named, with where it happened
                where = f"'{rewriter.rows[-1].name}'" if rewriter.rows else "none"
                raise StructfxError(
                    f"transform failed while rewriting (last layer visited: {where}): {type(e).__name__}: {e}; "
                    f"keep that part out with filter_fn and report the model to structfx"
                ) from e
        measured = [snapshot(batch) for batch in batches[1:] or batches]
        with torch.no_grad(), evaluation_mode(result), preserved_state(result):
            outputs, _ = _run_model(_outputs, result, measured, labels[1:] or labels, "the transformed model")
    setattr(result, REPORT_ATTRIBUTE, Report(
        rewriter.rows, output_errors(outputs, reference_outputs[1:] or reference_outputs),
        "calibration inputs" if len(batches) > 1 else "example inputs", structured,
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
    names = {m: module_place(name, type(m).__name__) for name, m in model.named_modules()}

    def started(module, args) -> None:
        running.append(names[module])

    def finished(module, args, output) -> None:  # returns None: a forward hook's result replaces the output
        running.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(started))
        handles.append(module.register_forward_hook(finished))
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
    """Rewrites region by region, each new layer entering as a StandIn (standin.py) so that every region
    is proven to compute what it computed before (proof.py), or left as it was."""

    rules: list[Rule]
    filter_fn: FilterFn | None
    calls: dict[nn.Module, list[Call]]
    use_calibration: bool
    parameter_names: dict[int, list[str]]  # id(parameter) -> every name it has in the model (tied: several)
    rows: list[Row] = field(default_factory=list)
    decisions: dict[object, StandIn | None] = field(default_factory=dict)  # a module, a weight or a node
    undo: list[Callable[[], None]] = field(default_factory=list)  # how to take back each change, in order

    def rewrite(self, module: nn.Module, prefix: str) -> nn.Module:
        """The module with its candidates replaced: a GraphModule where it traces and something changed,
        else the very same object with its children rewritten one by one."""
        site = site_from_module(prefix.rstrip("."), module)
        if site is not None:
            stand_in = self.module_stand_in(site)
            if stand_in is None:
                return module
            return InPlace(stand_in) if site.inplace else stand_in
        calls = self.calls.get(module)
        if not calls:
            return self._rewrite_children(module, prefix)
        try:
            gm = trace_call(module, *calls[0].fresh())
        except TraceFailure as failure:
            return self._fall_back(module, prefix, calls, failure)
        if not self._rewrite_graph(gm, prefix, module, calls):
            return module
        why = disproof(gm, calls)
        if why is not None:
            for stand_in in stand_ins(gm):
                stand_in.revoke(why)
            return module
        _keep_attributes(gm, module)
        gm.training = module.training  # a new GraphModule starts in training mode; its parts keep theirs
        return gm

    def _fall_back(self, module: nn.Module, prefix: str, calls: list[Call], failure: TraceFailure) -> nn.Module:
        """Children rewritten one by one (ReLU, F.linear and pool calls in the forward made children first); the
        module, run with them, must still reproduce its calls (those with each bool flag flipped among them),
        or it is left as it was."""
        mark = len(self.undo)
        calls = calls + self._flipped_calls(module, calls)
        rewritten = self._calls_as_modules(module, prefix, calls)
        self.rows.append(Row(prefix.rstrip(".") or "<model>", "", "fell back", str(failure)))
        self._rewrite_children(module, prefix)
        if rewritten is not None and rewritten.untouched():
            self.undo.pop(mark)()  # none of them replaced: the forward goes back to the class's own
        why = disproof(module, calls) if len(self.undo) > mark else None
        if why is not None:
            for stand_in in stand_ins(module):
                stand_in.revoke(why)
            while len(self.undo) > mark:
                self.undo.pop()()
        return module

    def _flipped_calls(self, module: nn.Module, calls: list[Call]) -> list[Call]:
        """The module's kept calls run again with each bool argument flipped, where the module runs that
        way: the other value's path is then recorded for its layers (fitted, sized and shared with it in
        view) and the module is proven on it too. Those with the original value are recorded in the model
        run already; None and string flags have no other value to try."""
        signature = inspect.signature(module.forward)
        runs = []
        for call in calls:
            if call.after is None:
                continue
            try:
                bound = signature.bind(*call.args, **call.kwargs)
            except TypeError:  # a call its own signature does not describe (a wrapped forward): nothing to flip
                continue
            bound.apply_defaults()
            for name, value in bound.arguments.items():
                if isinstance(value, bool):
                    flipped = copy.copy(bound)
                    flipped.arguments = {**bound.arguments, name: not value}
                    runs.append((call.batch, flipped.args, flipped.kwargs))
        flipped_calls = []
        for run in runs:
            try:
                recorded, _ = replay(module, [run])
            except Exception:  # noqa: BLE001 - the module does not take that value here: nothing to record
                continue
            for child, child_calls in recorded.items():
                if child is module:
                    flipped_calls.extend(child_calls)
                else:
                    self.calls.setdefault(child, []).extend(child_calls)
        return flipped_calls

    def _calls_as_modules(self, module: nn.Module, prefix: str, calls: list[Call]) -> Rewritten | None:
        """Makes the ReLU, F.linear and pool calls in the module's forward child modules (functional.py), with
        their calls; a call left alone gets its row."""
        kinds = {rule.kind for rule in self.rules}
        rewritten = calls_as_modules(module, kinds) if kinds else None
        if rewritten is None:
            return None
        for kind, call, why in rewritten.unconverted:
            rule = next(type(rule).__name__ for rule in self.rules if rule.kind == kind)
            self.rows.append(Row(f"{prefix}<{call}>", rule, "skipped", why))
        if not rewritten.children:
            return None
        try:
            recorded, _ = replay(module, [(c.batch, c.args, c.kwargs) for c in calls])
        except Exception as e:  # noqa: BLE001 - the rewritten forward fails: keep the original forward
            rewritten.undo()
            why = f"not rewritten: the forward with its calls made modules fails ({type(e).__name__}: {e})"
            for name, child in rewritten.children.items():
                kind = "relu" if isinstance(child, nn.ReLU) else "dense" if isinstance(child, nn.Linear) else "pool"
                rule = next(type(rule).__name__ for rule in self.rules if rule.kind == kind)
                self.rows.append(Row(f"{prefix}{name}", rule, "skipped", why))
            return None
        self.undo.append(rewritten.undo)
        for child in rewritten.children.values():
            self.calls[child] = recorded.get(child, [])
        return rewritten

    def _rewrite_children(self, module: nn.Module, prefix: str) -> nn.Module:
        for name, child in list(module.named_children()):
            new = self.rewrite(child, f"{prefix}{name}.")
            if new is not child:
                self.undo.append(lambda module=module, name=name, child=child: setattr(module, name, child))
                setattr(module, name, new)
        return module

    def _sample_calls(self, calls: list[Call]) -> list[Call]:
        return [c for c in calls if (c.batch > 0) == self.use_calibration]

    def _rewrite_graph(self, gm: fx.GraphModule, prefix: str, module: nn.Module, calls: list[Call]) -> bool:
        """Puts a stand-in at every site of ``gm``; False when nothing was put in."""
        sites = [site for node in list(gm.graph.nodes) if (site := site_from_node(gm, node, prefix))]
        sites = [site for site in sites if site.input_node is not None]
        if not sites:
            return False
        recorder = SiteInputRecorder(gm, {s.node: s.input_node for s in sites if s.node.op != "call_module"})
        with torch.no_grad(), evaluation_mode(gm), preserved_state(gm):
            for call in self._sample_calls(calls) or calls[:1]:
                args, kwargs = call.fresh()
                recorder.propagate(*bound_arguments(module, args, kwargs).values())
        attributes: dict[StandIn, str] = {}
        for site in sites:
            meta = site.input_node.meta.get("tensor_meta")
            site.input_shape = tuple(meta.shape) if hasattr(meta, "shape") else None
            if site.kind == "relu" and site.input_shape:
                site.channel_axis = channel_axis(gm, site.input_node, len(site.input_shape))
            if site.node.op == "call_module":
                stand_in = self.module_stand_in(site, direct_reads(gm, site.node))
            else:
                site.samples = recorder.samples.get(site.node, [])
                stand_in = self.functional_stand_in(gm, module, site)
            if stand_in is None:
                continue
            if site.node.op == "call_module":  # the module's own name: small.fc is fc's replacement
                attribute = str(site.node.target)
            else:
                attribute = attributes.get(stand_in) or unique_attribute(gm, site.name)
            attributes[stand_in] = attribute
            gm.add_submodule(attribute, stand_in)
            replace_node(gm, site, attribute)
        if not attributes:
            return False
        drop_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        return True

    def module_stand_in(self, site: Site, problem: str | None = None) -> StandIn | None:
        """One decision per module, from all of its recorded calls: every call site shares the result."""
        if site.module in self.decisions:
            return self.decisions[site.module]
        calls = self.calls.get(site.module, [])
        inputs = [c.args[0] for c in calls if c.args and isinstance(c.args[0], Tensor)]
        if not calls:
            problem = (
                "never called as a module on the recorded inputs (a path they did not take, or its parent uses "
                "it some other way, e.g. reads its weight)"
            )
        elif len(inputs) < len(calls):
            problem = "called without a tensor as its first argument"
        else:
            site.input_shape = tuple(inputs[0].shape)
            if site.kind == "relu":
                found = site.channel_axis
                if found is None:
                    found = axis_of_module_output(calls[0].producer, len(site.input_shape))
                site.channel_axis = resolved_axis(found, site.input_shape)
            problem = problem or shape_problem(site, inputs) or tie_problem(self.parameter_names, site.module)
        site.samples = capped([c.args[0] for c in self._sample_calls(calls) if c.args])
        stand_in = self.convert(site, problem)
        self.decisions[site.module] = stand_in
        return stand_in

    def functional_stand_in(self, gm: fx.GraphModule, region: nn.Module, site: Site) -> StandIn | None:
        """F.linear sites reading the same weight share one replacement; other functional sites are one each."""
        problem = None
        if site.kind == "dense":
            key = site.module.weight
            problem = (
                weight_read_problem(site) or tie_problem(self.parameter_names, site.module)
                or owner_problem(region, site, self.calls)
            )
        else:
            key = site.node
            if site.kind == "relu" and site.input_shape:
                site.channel_axis = resolved_axis(site.channel_axis, site.input_shape)
        if key in self.decisions:
            return self.decisions[key]
        stand_in = self.convert(site, problem)
        self.decisions[key] = stand_in
        return stand_in

    def convert(self, site: Site, problem: str | None = None) -> StandIn | None:
        """The stand-in for ``site`` under the first rule that claims it, with its report row."""
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
        if problem is not None:
            row.reason = problem
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
            raise StructfxError(
                f"{type(rule).__name__} could not convert {site.place}: {type(e).__name__}: {e}; "
                f"keep this layer with filter_fn"
            ) from e
        row.status, row.params_new, row.ops_new = "replaced", cost.parameter_count(new), cost.ops_per_row(new)
        row.padding = cost.padding_note(new)
        row.error = _layer_error(site, new)
        original = nn.ReLU() if isinstance(site.module, nn.ReLU) else site.module  # out of place, as sites are
        return StandIn(original, new.train(site.module.training), row)


def _keep_attributes(gm: fx.GraphModule, module: nn.Module) -> None:
    """The traced module's plain attributes (``eps``, ``config``, ...) stay readable on its GraphModule."""
    for name, value in vars(module).items():
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            setattr(gm, name, value)


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
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise StructfxError(
                    f"calibration batch {index}, input {position} holds NaN or infinite values: fits and errors "
                    f"measured on it would mean nothing; pass finite batches"
                )
        batches.append(args)
    return batches
