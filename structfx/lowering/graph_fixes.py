"""Rewrites of an exported program before TVM imports it: what TVM's importer gets wrong, fixed by kind.

- ``aten.view`` becomes ``aten.reshape`` before the core-ATen decomposition. Decomposing re-traces the
  graph with fake tensors, and some decompositions (scaled-dot-product attention's) return other strides
  than the eager kernels did, so a view that was legal when exported no longer is (HF ``Conv1D``'s
  ``x.view(-1, x.size(-1))`` after GPT-2's attention: "Cannot view a tensor with shape ... and strides").
  Relax has no strides and no aliasing after functionalisation, so both mean the same thing to TVM.
- Inputs whose size torch.export specialised (``Dim.AUTO`` that came out static) keep a SymInt whose
  expression is a constant; TVM turns it into a shape *variable* named "64", and every shape computed
  from it is unknown. Those sizes of their metadata are made ints, also beside a symbolic size (token
  ids of a symbolic batch and a sequence fixed at 8: Funnel).
- ``aten.cat`` drops the legacy empty 1-D tensors torch skips (transformers' DynamicCache starts each
  layer's keys and values as ``torch.tensor([])`` and concatenates onto it); TVM's concat refuses tensors
  of another rank ("Concat expects all input tensors to have same ndim").
- Negative dimension arguments (``dim=-1``, ``dims=[-2, -1]``...) of every ATen op are made
  non-negative from the rank of the tensor they index: TVM's converters pass some through unnormalised
  when a dimension is symbolic, and legalization then fails (``Check failed: axis < src_tensor_dim
  (-1 vs. 2)`` from ``torch.diff``/``narrow`` in Llama's causal mask).
- Negative indices of ``aten.select``/``aten.select_scatter`` (``x[:, -1]``, ``x[-1]``) are counted from
  the end of their dimension: TVM's converter emits ``take`` in its fast mode, which reads out of bounds
  for a negative index (silently wrong values). A static size is added to the index; on a symbolic dim a
  ``select`` becomes a ``slice`` of one element and a ``squeeze`` (TVM's slice counts negative starts from
  the end, also of a symbolic dim).
- Integer index tensors of ``aten.index``/``aten.index_put`` (``qkv[:, :, [-2]]`` in Falcon's attention)
  are counted from the end where negative (``where(i < 0, i + size, i)``): TVM's converter reads them
  unnormalised. Only dimensions of static size are handled (transformers' masks index the symbolic
  batch and sequence with ``arange``s, which are never negative).
- ``aten.slice_scatter`` over a whole dimension (what ``h[:, :4] = 0`` leaves on the batch dim) is its
  source: TVM's legalization of it needs constant bounds, and the batch is symbolic. Any other
  ``slice_scatter`` of step 1 along a symbolic dimension (``h[:2] = 0``) becomes the concatenation of the
  slices before and after the written part around it.
- ``None`` bounds of ``aten.slice.Tensor``/``aten.slice_scatter`` (``x[..., :8] = y`` leaves
  ``slice_scatter(x, y, 3, None, 8)``) become 0 and the end of the dimension: TVM's converter of
  ``slice_scatter`` cannot convert ``None`` ("Cannot convert None ... to `Expr`").
- ``aten.cumsum``/``aten.cumprod`` of a bool or integer tensor compute in int64 as torch does (their input
  is cast first): TVM keeps the input's dtype and its build rejects a bool scan
  (``Check failed: (t.MatchesCode(DLDataTypeCode::kDLFloat))``, the causal masks of GPT-2, Llama...).
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

from structfx.errors import StructfxError

aten = torch.ops.aten

#: Schema argument names that index a dimension.
DIM_ARGUMENTS = frozenset({"dim", "dims", "dim0", "dim1", "start_dim", "end_dim", "source", "destination", "axis"})
#: Ops whose dimension argument indexes the OUTPUT (one more dimension than the input).
INSERTS_DIM = frozenset({aten.unsqueeze.default, aten.stack.default})


def prepare_for_import(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program in core ATen (what ``from_exported_program`` would decompose it to), views as
    reshapes and every dimension argument non-negative. Call ``from_exported_program`` on the result
    with ``run_ep_decomposition=False``."""
    views_as_reshapes(program.graph_module)
    with warnings.catch_warnings():  # torch's own deprecated pytree call inside, printed on every compile
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        program = program.run_decompositions()
    static_placeholders(program.graph_module)
    concat_without_empty(program.graph_module)
    normalize_dims(program.graph_module)
    normalize_indices(program.graph_module)
    normalize_index_tensors(program.graph_module)
    explicit_slice_bounds(program.graph_module)
    whole_slice_scatters(program.graph_module)
    slice_scatters_as_concat(program.graph_module)
    scans_in_result_dtype(program.graph_module)
    return program


def views_as_reshapes(gm: torch.fx.GraphModule) -> int:
    """Turn every ``aten.view`` into ``aten.reshape`` in place; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default
            count += 1
    if count:
        gm.recompile()
    return count


def static_placeholders(gm: torch.fx.GraphModule) -> int:
    """Give every placeholder's SymInt sizes that are constants plain int sizes, in place (its symbolic
    sizes stay); returns how many placeholders changed."""
    changed = 0
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        if not any(isinstance(d, torch.SymInt) and _constant(d) is not None for d in value.shape):
            continue
        sizes = [d if _constant(d) is None else _constant(d) for d in value.shape]
        with value.fake_mode if hasattr(value, "fake_mode") else contextlib.nullcontext():
            node.meta["val"] = torch.empty(sizes, dtype=value.dtype, device=value.device)
        if "tensor_meta" in node.meta:
            node.meta["tensor_meta"] = node.meta["tensor_meta"]._replace(shape=torch.Size(sizes))
        changed += 1
    return changed


def _constant(size) -> int | None:
    """A size as an int where it is one (a SymInt whose expression is a constant), else None."""
    if isinstance(size, int):
        return size
    expr = size.node.expr
    return int(expr) if expr.is_Integer else None


def concat_without_empty(gm: torch.fx.GraphModule) -> int:
    """Drop the ``(0,)``-shaped inputs of every ``aten.cat`` of higher-rank tensors, in place (torch
    skips them); returns how many."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        out = node.meta.get("val")
        kept = [t for t in node.args[0] if not (out is not None and out.dim() > 1 and _is_legacy_empty(t))]
        if len(kept) == len(node.args[0]):
            continue
        dropped += len(node.args[0]) - len(kept)
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
            gm.graph.erase_node(node)
        else:
            node.args = (kept, *node.args[1:])
    if dropped:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return dropped


def _is_legacy_empty(node) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 1 and _constant(value.shape[0]) == 0


def normalize_dims(gm: torch.fx.GraphModule) -> int:
    """Make every negative dimension argument of an ATen op non-negative, in place; returns how many
    arguments changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        rank = _rank(node)
        if rank is None:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for i, argument in enumerate(node.target._schema.arguments):
            if argument.name not in DIM_ARGUMENTS:
                continue
            if i < len(args):
                args[i], n = _non_negative(args[i], rank)
            elif argument.name in kwargs:
                kwargs[argument.name], n = _non_negative(kwargs[argument.name], rank)
            else:
                continue
            changed += n
        node.args, node.kwargs = tuple(args), kwargs
    if changed:
        gm.recompile()
    return changed


def _rank(node: torch.fx.Node) -> int | None:
    """The rank a dimension argument of ``node`` counts in, None when unknown."""
    source = node if node.target in INSERTS_DIM else _first_tensor(node.args[0] if node.args else None)
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _first_tensor(arg):
    if isinstance(arg, (list, tuple)):
        return arg[0] if arg else None
    return arg


def _non_negative(value, rank: int):
    """(value with negative ints made non-negative, how many changed): an int or a list of ints."""
    if isinstance(value, bool):
        return value, 0
    if isinstance(value, int):
        return (value + rank, 1) if value < 0 else (value, 0)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        fixed = [v + rank if v < 0 else v for v in value]
        return type(value)(fixed), sum(v < 0 for v in value)
    return value, 0


def normalize_indices(gm: torch.fx.GraphModule) -> int:
    """Count every negative index of ``aten.select``/``aten.select_scatter`` from the end of its
    dimension, in place; returns how many nodes changed. Raises StructfxError for a ``select_scatter``
    at a negative index of a symbolic dimension (no TVM form of it counts from the end)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.select.int, aten.select_scatter.default):
            continue
        scatter = node.target is aten.select_scatter.default
        source, dim, index = (node.args[0], node.args[2], node.args[3]) if scatter else node.args[:3]
        if not isinstance(index, int) or index >= 0:
            continue
        size = _constant(source.meta["val"].shape[dim])
        if size is not None:
            node.args = (*node.args[:-1], index + size)
        elif scatter:
            raise StructfxError(
                f"[import] {node.format_node()} assigns at index {index} of dim {dim}, whose size varies with the "
                f"batch: compile cannot count it from the end; index it from the start, or assign with torch.where"
            )
        else:
            _select_as_slice(gm, node, source, dim, index)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _select_as_slice(gm: torch.fx.GraphModule, node: torch.fx.Node, source, dim: int, index: int) -> None:
    """Replace ``select(source, dim, index)`` by ``squeeze(slice(source, dim, index, index + 1), dim)``."""
    end = index + 1 if index < -1 else sys.maxsize
    with gm.graph.inserting_before(node):
        sliced = gm.graph.call_function(aten.slice.Tensor, (source, dim, index, end))
        sliced.meta = {**node.meta, "val": aten.slice.Tensor(source.meta["val"], dim, index, end)}
        squeezed = gm.graph.call_function(aten.squeeze.dims, (sliced, [dim]))
        squeezed.meta = dict(node.meta)
    node.replace_all_uses_with(squeezed)
    gm.graph.erase_node(node)


def normalize_index_tensors(gm: torch.fx.GraphModule) -> int:
    """Wrap every integer index tensor of ``aten.index.Tensor``/``aten.index_put.default`` that indexes a
    dimension of static size in ``where(i < 0, i + size, i)``, in place; returns how many. An index of a
    symbolic dimension is left as it is."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.index.Tensor, aten.index_put.default):
            continue
        source, indices = node.args[0], list(node.args[1])
        shape = source.meta["val"].shape
        for dim, index in enumerate(indices):
            value = index.meta.get("val") if isinstance(index, torch.fx.Node) else None
            if value is None or value.dtype in (torch.bool, torch.uint8):
                continue
            size = _constant(shape[dim])
            if size is None:
                continue
            with gm.graph.inserting_before(node):
                negative = gm.graph.call_function(aten.lt.Scalar, (index, 0))
                negative.meta = {"val": aten.lt.Scalar(value, 0)}
                wrapped = gm.graph.call_function(aten.add.Tensor, (index, size))
                wrapped.meta = {"val": aten.add.Tensor(value, size)}
                indices[dim] = gm.graph.call_function(aten.where.self, (negative, wrapped, index))
                indices[dim].meta = {"val": aten.where.self(negative.meta["val"], wrapped.meta["val"], value)}
            changed += 1
        node.args = (source, indices, *node.args[2:])
    if changed:
        gm.recompile()
    return changed


def _bound_arguments(node: torch.fx.Node) -> dict:
    """The call's arguments by their schema names (positional and keyword alike)."""
    names = [a.name for a in node.target._schema.arguments]
    return dict(zip(names, node.args)) | dict(node.kwargs)


def explicit_slice_bounds(gm: torch.fx.GraphModule) -> int:
    """Give every ``aten.slice.Tensor``/``aten.slice_scatter`` a start of 0 for ``None`` and an end of
    ``sys.maxsize`` (torch's "to the end") for ``None``, in place; returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.slice_scatter.default):
            continue
        names = [a.name for a in node.target._schema.arguments]
        args, kwargs = list(node.args), dict(node.kwargs)
        for name, default in (("start", 0), ("end", sys.maxsize)):
            i = names.index(name)
            if i < len(args) and args[i] is None:
                args[i] = default
            elif name in kwargs and kwargs[name] is None:
                kwargs[name] = default
            else:
                continue
            changed += 1
        node.args, node.kwargs = tuple(args), kwargs
    if changed:
        gm.recompile()
    return changed


def whole_slice_scatters(gm: torch.fx.GraphModule) -> int:
    """Replace every ``aten.slice_scatter`` that writes a whole dimension (start 0, step 1, end at or
    past its size) by the tensor it writes, in place; returns how many."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.slice_scatter.default:
            continue
        bound = _bound_arguments(node)
        source, written = bound["self"], bound["src"]
        dim, start, end, step = (bound.get(k, d) for k, d in (("dim", 0), ("start", None), ("end", None), ("step", 1)))
        size = source.meta["val"].shape[dim]
        whole_end = end is None or end == sys.maxsize or (isinstance(end, int) and _constant(size) is not None
                                                          and end >= _constant(size))
        if start in (None, 0) and step == 1 and whole_end and written.meta["val"].shape == source.meta["val"].shape:
            node.replace_all_uses_with(written)
            gm.graph.erase_node(node)
            replaced += 1
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return replaced


def slice_scatters_as_concat(gm: torch.fx.GraphModule) -> int:
    """Replace every ``aten.slice_scatter`` of step 1 along a symbolic dimension by
    ``cat([self[..start], src, self[end..]], dim)``, in place; returns how many."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.slice_scatter.default:
            continue
        bound = _bound_arguments(node)
        source, written = bound["self"], bound["src"]
        dim, start, end = bound.get("dim", 0), bound.get("start") or 0, bound.get("end")
        if bound.get("step", 1) != 1 or _constant(source.meta["val"].shape[dim]) is not None:
            continue
        if not all(isinstance(v, int) for v in (dim, start)) or not isinstance(end, (int, type(None))):
            continue
        with gm.graph.inserting_before(node):
            pieces = [written]
            if start != 0:
                pieces.insert(0, _slice(gm, source, dim, 0, start))
            if end is not None and end != sys.maxsize:
                pieces.append(_slice(gm, source, dim, end, sys.maxsize))
            joined = gm.graph.call_function(aten.cat.default, (pieces, dim)) if len(pieces) > 1 else written
            joined.meta = dict(node.meta) if len(pieces) > 1 else joined.meta
        node.replace_all_uses_with(joined)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return replaced


def _slice(gm: torch.fx.GraphModule, source: torch.fx.Node, dim: int, start: int, end: int) -> torch.fx.Node:
    sliced = gm.graph.call_function(aten.slice.Tensor, (source, dim, start, end))
    sliced.meta = {"val": aten.slice.Tensor(source.meta["val"], dim, start, end)}
    return sliced


def scans_in_result_dtype(gm: torch.fx.GraphModule) -> int:
    """Cast the input of every ``aten.cumsum``/``aten.cumprod`` whose result has another dtype (torch
    scans bool and integer tensors in int64) to the result's dtype, in place; returns how many."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.cumsum.default, aten.cumprod.default):
            continue
        source, out = node.args[0], node.meta.get("val")
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor) or value.dtype == out.dtype:
            continue
        with gm.graph.inserting_before(node):
            cast = gm.graph.call_function(aten._to_copy.default, (source,), {"dtype": out.dtype})
            cast.meta = {**source.meta, "val": value.to(out.dtype)}
        node.args = (cast, *node.args[1:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        changed += 1
    if changed:
        gm.recompile()
    return changed
