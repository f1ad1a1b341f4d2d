"""torch.export for compilation: inference mode, each input's dynamic dims decided on their own.

Dim 0 of every tensor input is asked to be dynamic (one batch shared by all inputs, first), and for
transformers models dim 1 of integer inputs of rank 2 (token ids, attention masks: the sequence) up to
the model's maximum length where its config gives one.
torch.export's constraint solver decides: an input without a batch dim (a (64,) bias, a (T, T) mask)
comes out static while the others vary. A dim that must become static is named, with torch's reason,
in a warning before anything is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass

import sympy
import torch
from torch import Tensor, nn
from torch.export import Dim

from structfx.errors import StructfxError
from structfx.lowering.state import warn_training_mode
from structfx.passes.recording import evaluation_mode, preserved_state, snapshot
from structfx.runtime.signature import TensorSpec

#: Config fields that give a transformers model's longest sequence, in the order they are looked up.
MAX_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_source_positions", "max_length")


@dataclass(frozen=True)
class DynamicDim:
    """A dim compile asks torch.export to keep symbolic: which input, which dim, its role and bound."""

    input: int
    dim: int
    role: str  # "batch" or "sequence"
    maximum: int | None = None

    def describe(self, names: list[str]) -> str:
        return f"dim {self.dim} ({self.role}) of input {names[self.input]!r}"


def example_arguments(example_inputs, entry: str) -> tuple:
    """``example_inputs`` as the tuple of forward's positional arguments: a tensor (or dict) is one
    argument, a tuple or list is several. Raises StructfxError naming ``entry`` for anything else."""
    if isinstance(example_inputs, (Tensor, dict)):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    hint = ": convert numpy arrays with torch.from_numpy" if hasattr(example_inputs, "__array__") else ""
    raise StructfxError(
        f"{entry}'s example_inputs must be a tensor or a tuple of a forward call's inputs, got "
        f"{type(example_inputs).__name__}{hint}"
    )


#: What torch.export raises for a model it cannot capture (turned into a StructfxError naming the cause).
EXPORT_FAILURES = (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError)


def export_for_compile(model: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """Export ``model`` on ``args`` in eval mode, with the dims of ``requested_dims`` symbolic where the
    model allows. Raises StructfxError (stage "export") naming the cause and the fix."""
    names = input_names(model, len(args))
    check_example_inputs(model, args, names)
    warn_training_mode(model, stacklevel=3)
    requested = requested_dims(model, args)
    example = _exportable_example(args, requested)
    with evaluation_mode(model), torch.no_grad(), _register_output_types(model):
        try:
            return _export(model, example, requested, Dim.DYNAMIC, shared_batch=True)
        except torch._dynamo.exc.UserError as e:
            if e.error_type is not torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
                raise export_error(model, e) from e
            reason = e
        except EXPORT_FAILURES as e:
            raise export_error(model, e) from e
        try:
            program = _export(model, example, requested, Dim.AUTO)
        except EXPORT_FAILURES as e:
            raise export_error(model, e) from e
    static = [d for d in requested if not _is_symbolic(program, d)]
    if static:
        dims = "; ".join(d.describe(names) for d in static)
        warnings.warn(
            f"compiling {type(model).__name__} with {dims} fixed at the example's size: the model does not "
            f"allow it to vary (torch.export: {_specialisations(reason)})",
            stacklevel=3,
        )
    return program


def input_names(model: nn.Module, count: int) -> list[str]:
    """The names of forward's first ``count`` positional parameters (``input{i}`` where unknown)."""
    positional = [p.name for p in _forward_parameters(model) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [positional[i] if i < len(positional) else f"input{i}" for i in range(count)]


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """forward's parameters; none where Python cannot read its signature (a C-implemented forward)."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def check_example_inputs(model: nn.Module, args: tuple, names: list[str]) -> None:
    """Refuse what compile cannot take before exporting: non-tensor inputs, keyword-only parameters
    forward needs, and inputs the model itself rejects in eager mode (a dtype it does not compute in)."""
    for name, arg in zip(names, args):
        if isinstance(arg, dict):
            raise StructfxError(
                f"example input {name!r} is a dict: compile takes tensors, passed positionally in forward's "
                f"order; pass the dict's tensors as a tuple (e.g. tuple(batch.values())), or wrap the model in a "
                f"module whose forward takes them one by one"
            )
        if not isinstance(arg, Tensor):
            raise StructfxError(
                f"example input {name!r} is a {type(arg).__name__}: compile takes tensors only; fix non-tensor "
                f"arguments in a wrapper module (e.g. functools.partial inside its forward)"
            )
    required = [p.name for p in _forward_parameters(model) if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if required:
        raise StructfxError(
            f"{type(model).__name__}.forward takes {', '.join(required)} as keyword-only: compile passes example "
            f"inputs positionally; wrap it in a module whose forward(self, {', '.join(required)}) calls "
            f"model({', '.join(f'{n}={n}' for n in required)})"
        )
    with evaluation_mode(model), preserved_state(model), torch.no_grad(), _quiet_torch_logs():
        try:
            model(*snapshot(args))  # a forward that writes its inputs or buffers leaves the caller's as they were
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise StructfxError(_eager_failure(model, args, names, e)) from e


def _eager_failure(model: nn.Module, args: tuple, names: list[str], error: Exception) -> str:
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    given = ", ".join(f"{n}: {tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" for n, a in zip(names, args))
    message = f"[export] {type(model).__name__} fails on the example inputs in eager PyTorch ({_first_lines(error, 1)})"
    suspects = [
        n for n, a in zip(names, args)
        if weights is not None and not a.is_floating_point() and "dtype" in str(error).lower()
        or weights is not None and a.is_floating_point() and a.dtype != weights
    ]
    if suspects:
        want = str(weights).removeprefix("torch.")
        return (
            f"{message}: input {', '.join(repr(s) for s in suspects)} has the wrong dtype for a model that computes "
            f"in {want} (given {given}); pass {want} tensors (e.g. x.to(torch.{want}))"
        )
    return f"{message}; given {given}: pass inputs the model runs on"


def requested_dims(model: nn.Module, args: tuple) -> list[DynamicDim]:
    """Dim 0 of every tensor with at least one dim, except a dim 0 of size 1 beside a larger one (an input
    that broadcasts over the batch, e.g. a (1, d) bias); for a model with a (transformers) config, dim 1 of
    rank-2 integer tensors (token ids and their masks), bounded by the model's maximum sequence length
    where the config gives one. The config is the model's own, else its first submodule's that has one (a
    wrapper module around a transformers model)."""
    config = next((m.config for m in model.modules() if getattr(m, "config", None) is not None), None)
    longest = next((getattr(config, f) for f in MAX_LENGTH_FIELDS if isinstance(getattr(config, f, None), int)), None)
    longest = _offset_positions(model, longest)
    batch = max((arg.shape[0] for arg in args if arg.dim() > 0), default=0)
    dims = []
    for i, arg in enumerate(args):
        if arg.dim() > 0 and not (arg.shape[0] == 1 < batch):
            dims.append(DynamicDim(i, 0, "batch"))
        if arg.dim() == 2 and config is not None and not arg.is_floating_point():
            dims.append(DynamicDim(i, 1, "sequence", longest))
    return dims


def _offset_positions(model: nn.Module, longest: int | None) -> int | None:
    """``longest`` lowered for a position table that reserves its rows up to ``padding_idx``: RoBERTa-like
    models (XLM-R, Data2VecText, CamemBERT) number positions from ``padding_idx + 1``, so a table of
    ``max_position_embeddings`` rows serves ``max_position_embeddings - padding_idx - 1`` tokens."""
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, nn.Embedding) and table.padding_idx is not None and longest is not None:
            longest = min(longest, table.num_embeddings - table.padding_idx - 1)
    return longest


def _exportable_example(args: tuple, requested: list[DynamicDim]) -> tuple:
    """``args`` with every requested dim of size 0 or 1 grown to 2 (by repeating): torch.export
    specialises sizes 0 and 1; and an input sharing memory with an earlier one (``(x, x)``) copied: torch.export
    cannot functionalise writes to aliased inputs, and the compiled function takes its inputs as distinct."""
    storages = [a.untyped_storage().data_ptr() if a.numel() else None for a in args]
    grown = [a.clone() if s is not None and s in storages[:i] else a for i, (a, s) in enumerate(zip(args, storages))]
    for d in requested:
        size = grown[d.input].shape[d.dim]
        if size == 1:
            grown[d.input] = torch.cat([grown[d.input]] * 2, dim=d.dim)
    return tuple(grown)


def _export(model: nn.Module, example: tuple, requested: list[DynamicDim], hint,
            shared_batch: bool = False) -> torch.export.ExportedProgram:
    """One torch.export with the requested dims as ``hint`` (Dim.DYNAMIC or Dim.AUTO), or with one
    named Dim for every batch dim (they must then be equal) where ``shared_batch``."""
    sizes = {example[d.input].shape[0] for d in requested if d.role == "batch"}
    batch = Dim("batch") if shared_batch and len(sizes) == 1 and len(requested) > 1 else None
    shapes: list[dict | None] = [None] * len(example)
    for d in requested:
        spec = hint(min=2, max=d.maximum) if d.maximum else hint
        shapes[d.input] = {**(shapes[d.input] or {}), d.dim: batch if d.role == "batch" and batch else spec}
    with _quiet_torch_logs():
        return torch.export.export(model, example, dynamic_shapes=_in_signature(model, shapes), strict=False)


def _in_signature(model: nn.Module, shapes: list) -> tuple:
    """``shapes`` (one per positional input) in the structure torch.export matches them to forward's
    parameters by: the inputs that fill a ``*args`` parameter are one tuple there."""
    parameters = _forward_parameters(model)
    named = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not any(p.kind is p.VAR_POSITIONAL for p in parameters) or len(shapes) < len(named):
        return tuple(shapes)
    return (*shapes[: len(named)], tuple(shapes[len(named):]))


def _is_symbolic(program: torch.export.ExportedProgram, d: DynamicDim) -> bool:
    kinds = torch.export.graph_signature.InputKind
    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind == kinds.USER_INPUT]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user[d.input])
    size = node.meta["val"].shape[d.dim]
    return not isinstance(size, int) and not size.node.expr.is_Integer


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs whole graphs at warning level when it fails: keep them off stderr (the error
    raised says what failed)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch.export", "torch._export",
                                                "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _register_output_types(model: nn.Module):
    """transformers models return cache objects (GPT-2's DynamicCache with use_cache=True): register them
    as pytree nodes the way transformers' own exporter does, so their tensors become outputs."""
    if type(model).__module__.startswith("transformers."):
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model

        register_cache_pytrees_for_model(model)
    yield


def export_error(model: nn.Module, error: Exception) -> StructfxError:
    """The StructfxError for a failed export; the control-flow hint only where control flow is the cause."""
    where = _user_frame(error)
    message = f"[export] torch.export could not capture {type(model).__name__}{where}: {_first_lines(error, 2)}"
    if _is_control_flow(error):
        message += (
            ". compile needs an exportable forward: no Python control flow on tensor values (rewrite it with "
            "torch.where / torch.cond, or move it out of forward)"
        )
    else:
        message += ". Fix or wrap the part of forward named above so torch.export can trace it"
    return StructfxError(message)


def _is_control_flow(error: Exception) -> bool:
    text = str(error)
    if isinstance(error, torch._dynamo.exc.UserError):
        return error.error_type is torch._dynamo.exc.UserErrorType.DYNAMIC_CONTROL_FLOW
    data_dependent = getattr(torch.fx.experimental.symbolic_shapes, "GuardOnDataDependentSymNode", ())
    return isinstance(error, data_dependent) or "data-dependent" in text or "data dependent" in text


def _user_frame(error: Exception) -> str:
    """` at file:line` of the innermost frame of the model's own code in the traceback, '' if none."""
    tb, found = error.__traceback__, ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "/torch/" not in filename and "/structfx/lowering/" not in filename:
            found = f" at {filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _specialisations(error: Exception) -> str:
    """torch.export's lines saying which dims it specialised and to what, without its generic advice."""
    pattern = r"You marked (\S+) as dynamic but your code (specialized it to be a constant \(\d+\))"
    found = re.findall(pattern, str(error))
    return "; ".join(f"{where} {what}" for where, what in found) or _first_lines(error, 2)


def _first_lines(error: Exception, count: int) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:count]) if lines else type(error).__name__


def input_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    """The user inputs' specs; a symbolic dim is named by its role where it first appears ("batch" at
    dim 0, "sequence" at dim 1), the same name wherever the same symbol appears."""
    kinds = torch.export.graph_signature.InputKind
    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind == kinds.USER_INPUT}
    nodes = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    specs = [_spec(n.name, n.meta["val"], _dim_names(program)) for n in nodes]
    return [dataclasses.replace(spec, values=_table_rows(n)) for spec, n in zip(specs, nodes)]


def _table_rows(node: torch.fx.Node) -> tuple[int, int] | None:
    """(low, high) of the values torch accepts in ``node`` (an integer input) where it indexes tensors
    directly: (0, rows) for an embedding table, (-n, n) for ``x[node]`` and (0, n) for ``index_select``
    along a static dim of n; the narrowest over its uses. None where it indexes nothing."""
    aten = torch.ops.aten
    ranges = []
    for user in node.users:
        if user.target is aten.embedding.default and user.args[1] is node:
            ranges.append((0, int(user.args[0].meta["val"].shape[0])))
            continue
        if user.target is aten.index.Tensor and [i for i in user.args[1] if i is not None] == [node]:
            dim, negative = list(user.args[1]).index(node), True
        elif user.target is aten.index_select.default and user.args[2] is node:
            dim, negative = user.args[1], False
        else:
            continue
        extent = user.args[0].meta["val"].shape[dim]
        if isinstance(extent, int):
            ranges.append((-extent if negative else 0, extent))
    if not ranges:
        return None
    return max(low for low, _ in ranges), min(high for _, high in ranges)


def require_tensor_outputs(program: torch.export.ExportedProgram, model: nn.Module) -> None:
    """Raise StructfxError (stage "export") naming the first output of ``model``'s forward that is not a
    tensor (``None``, a number): the compiled function returns tensors only."""
    outputs = next(n for n in program.graph.nodes if n.op == "output").args[0]
    for position, output in enumerate(outputs):
        if not isinstance(output, torch.fx.Node):
            raise StructfxError(
                f"[export] {type(model).__name__}.forward returns {output!r} as its output {position} (counting "
                "the tensors in its output structure in order); compile returns tensors only: return only "
                "the tensors, or compile a wrapper module whose forward drops the others"
            )


def output_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    """The specs of forward's own outputs (not the updates of a functionalised program)."""
    outputs = next(n for n in program.graph.nodes if n.op == "output").args[0]
    kinds = [s.kind for s in program.graph_signature.output_specs]
    own = [node for node, kind in zip(outputs, kinds) if kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    return [_spec(f"output{i}", node.meta["val"], _dim_names(program)) for i, node in enumerate(own)]


def _dim_names(program: torch.export.ExportedProgram) -> dict:
    """symbol -> (name, (lower, upper or None)) for every symbol that is a whole input dim."""
    kinds = torch.export.graph_signature.InputKind
    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind == kinds.USER_INPUT}
    names: dict = {}
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        for dim, size in enumerate(node.meta["val"].shape):
            expr = size.node.expr if hasattr(size, "node") else None
            if expr is None or not expr.is_Symbol or expr in names:
                continue
            role = {0: "batch", 1: "sequence"}.get(dim, f"dim{dim}")
            taken = {name for name, _ in names.values()}
            name = role if role not in taken else next(f"{role}{i}" for i in range(2, 99) if f"{role}{i}" not in taken)
            bounds = program.range_constraints.get(expr)
            upper = None if bounds is None or math.isinf(float(bounds.upper)) else int(bounds.upper)
            lower = 1 if bounds is None or int(bounds.lower) <= 2 else int(bounds.lower)  # 2: torch's 0/1 rule
            names[expr] = (name, (lower, upper))
    return names


def _spec(name: str, value: Tensor, names: dict) -> TensorSpec:
    """Static dims as ints, symbolic ones by name (an expression of them as its text)."""
    shape, bounds = [], {}
    for size in value.shape:
        if not hasattr(size, "node"):
            shape.append(int(size))
            continue
        expr = size.node.expr
        if expr.is_Integer:
            shape.append(int(expr))
        elif expr in names:
            shape.append(names[expr][0])
            bounds[names[expr][0]] = names[expr][1]
        else:
            shape.append(str(expr.subs({symbol: sympy.Symbol(n) for symbol, (n, _) in names.items()})))
    return TensorSpec(name, tuple(shape), str(value.dtype).removeprefix("torch."), bounds)
