"""torch's order of floats for ``argmax``/``argmin``, ``max.dim``/``min.dim``, ``sort``, ``argsort``, ``topk``,
``median.dim``, ``nanmedian.dim``, ``kthvalue``, ``cummax`` and ``cummin``.

torch orders NaN above every number (``sort`` puts NaN last ascending and first descending, ``topk`` returns
NaN first among the largest) and its ``argmax``, ``argmin`` and ``median`` return the index of a row's first
NaN; ``-0.0`` and ``0.0`` tie. TVM compares floats with ``<`` and ``>``, which are false for NaN: its sorts
(``std::sort`` with a comparator that is not a strict weak order) put NaN anywhere and its arg-reductions
skip NaN.

Here each float is mapped to an integer of its width that has torch's order (the IEEE 754 magnitude bits,
negated for a negative float, so that integer order is float order and ``-0.0`` ties with ``0.0``; every
NaN mapped to the largest integer, or to the smallest for ``argmin``), TVM's sort or arg-reduction
runs on those integers (stable, first index on ties), and values are gathered from the input at the
indices found, so NaN payloads and the sign of zero come back as torch returns them. Integer inputs are
sorted as they are.
"""

from __future__ import annotations

import torch

from structfx.lowering.compat import relax, te, tirx

#: Each float dtype: the signed integer of its width and the bits of +infinity (all exponent bits).
BITS = {"float16": ("int16", 0x7C00), "bfloat16": ("int16", 0x7F80), "float32": ("int32", 0x7F800000),
        "float64": ("int64", 0x7FF0000000000000)}


def order_key(x: te.Tensor, nan_largest: bool = True) -> te.Tensor:
    """Integers of ``x``'s width (int32 for float32, int64 for float64; int32 for the 16-bit floats, whose
    keys are sign-extended) in the order torch gives the floats of ``x``: NaN above (``nan_largest``) or
    below every number, ``-0.0`` equal to ``0.0``. Same shape as ``x``.

    From the bits alone (TVM has no ``isnan`` for bfloat16): a float's key is its magnitude bits (exponent
    and mantissa, which order magnitudes as integers), negated for a negative float, so ``-0.0`` and ``0.0``
    both get 0; magnitude bits above +infinity's are a NaN."""
    bits, infinity = BITS[str(x.dtype)]
    width = int(bits.removeprefix("int"))
    magnitude_mask = tirx.const((1 << (width - 1)) - 1, bits)
    nan_key = magnitude_mask if nan_largest else tirx.const(-(1 << (width - 1)), bits)

    def key(*index):
        b = tirx.reinterpret(bits, x(*index))
        magnitude = tirx.bitwise_and(b, magnitude_mask)
        ordered = tirx.Select(magnitude > tirx.const(infinity, bits), nan_key,
                              tirx.Select(b < tirx.const(0, bits), -magnitude, magnitude))
        return ordered if width >= 32 else ordered.astype("int32")  # TVM's sorts take 32 and 64 bits

    return te.compute(x.shape, key, name="torch_order_key")


def _key(importer, x, nan_largest: bool = True):
    if str(x.ty.dtype) not in BITS:
        return x
    return importer.block_builder.emit_te(order_key, x, nan_largest)


def _arg(node: torch.fx.Node, position: int, name: str, default):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def arg_extremum(largest: bool):
    """Converter of ``argmax(x, dim=None, keepdim=False)`` (``largest``) or ``argmin``."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        x = importer.env[node.args[0]]
        dim, keepdim = _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False)
        reduce = relax.op.argmax if largest else relax.op.argmin
        # argmin's NaN is its smallest key: the first NaN wins either way
        return importer.block_builder.emit(reduce(_key(importer, x, nan_largest=largest), dim, keepdim))

    return convert


def extremum_with_index(largest: bool):
    """Converter of ``max.dim(x, dim, keepdim=False)`` (``largest``) or ``min.dim``: (values, indices), the
    values read from ``x`` at the indices."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        x, emit = importer.env[node.args[0]], importer.block_builder.emit
        dim, keepdim = node.args[1], _arg(node, 2, "keepdim", False)
        reduce = relax.op.argmax if largest else relax.op.argmin
        indices = emit(reduce(_key(importer, x, nan_largest=largest), dim, keepdims=True))
        values = emit(relax.op.gather_elements(x, indices, axis=dim))
        if not keepdim:
            values, indices = emit(relax.op.squeeze(values, [dim])), emit(relax.op.squeeze(indices, [dim]))
        return emit(relax.Tuple([values, indices]))

    return convert


def _sort_args(node: torch.fx.Node) -> tuple[int, bool]:
    """(dim, descending) of ``sort``/``argsort`` ``(x, dim=-1, descending=False)`` or their ``.stable``
    overloads (``(x, *, stable, dim=-1, descending=False)``, all keywords)."""
    if node.target.__name__.endswith(".stable"):
        return node.kwargs.get("dim", -1), node.kwargs.get("descending", False)
    return _arg(node, 1, "dim", -1), _arg(node, 2, "descending", False)


def convert_argsort(node: torch.fx.Node, importer) -> relax.Var:
    """``argsort``: TVM's (stable) argsort of the order keys."""
    dim, descending = _sort_args(node)
    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.argsort(_key(importer, x), dim, descending, dtype="int64"))


def convert_sort(node: torch.fx.Node, importer) -> relax.Var:
    """``sort``: (values, indices), the indices of the keys' stable argsort and the values of ``x`` there."""
    dim, descending = _sort_args(node)
    x, emit = importer.env[node.args[0]], importer.block_builder.emit
    indices = emit(relax.op.argsort(_key(importer, x), dim, descending, dtype="int64"))
    return emit(relax.Tuple([emit(relax.op.gather_elements(x, indices, axis=dim)), indices]))


def convert_topk(node: torch.fx.Node, importer) -> relax.Var:
    """``topk(x, k, dim=-1, largest=True, sorted=True)``: (values, indices), the keys' top k and the
    values of ``x`` there."""
    x, emit = importer.env[node.args[0]], importer.block_builder.emit
    k, dim, largest = node.args[1], _arg(node, 2, "dim", -1), _arg(node, 3, "largest", True)
    indices = emit(relax.op.topk(_key(importer, x), k=k, axis=dim, largest=largest, ret_type="indices",
                                 dtype="int64"))
    return emit(relax.Tuple([emit(relax.op.gather_elements(x, indices, axis=dim)), indices]))


def convert_median(node: torch.fx.Node, importer) -> relax.Var:
    """``median.dim(x, dim, keepdim=False)``: (values, indices), the lower median of each row in torch's
    order, or the row's first NaN where it has one (as torch's). A dim of symbolic size keeps TVM's."""
    x, emit = importer.env[node.args[0]], importer.block_builder.emit
    shape = list(x.ty.shape)
    dim, keepdim = node.args[1] % len(shape), _arg(node, 2, "keepdim", False)
    if not isinstance(shape[dim], tirx.IntImm):
        return importer._median(node)
    middle = (int(shape[dim]) - 1) // 2
    key = _key(importer, x)
    order = emit(relax.op.argsort(key, dim, False, dtype="int64"))
    indices = emit(relax.op.strided_slice(order, [dim], [middle], [middle + 1]))
    if key is not x:  # a float row with a NaN: its first NaN (NaN has the largest key)
        first_nan = emit(relax.op.argmax(key, dim, keepdims=True))
        top = emit(relax.op.gather_elements(key, first_nan, axis=dim))
        has_nan = emit(relax.op.equal(top, relax.const(_nan_key(str(x.ty.dtype)), str(key.ty.dtype))))
        indices = emit(relax.op.where(has_nan, first_nan, indices))
    values = emit(relax.op.gather_elements(x, indices, axis=dim))
    if not keepdim:
        values, indices = emit(relax.op.squeeze(values, [dim])), emit(relax.op.squeeze(indices, [dim]))
    return emit(relax.Tuple([values, indices]))


def _kept(emit, values, indices, dim: int, keepdim: bool):
    if not keepdim:
        values, indices = emit(relax.op.squeeze(values, [dim])), emit(relax.op.squeeze(indices, [dim]))
    return emit(relax.Tuple([values, indices]))


def convert_kthvalue(node: torch.fx.Node, importer) -> relax.Var:
    """``kthvalue(x, k, dim=-1, keepdim=False)``: (values, indices), the k-th smallest of each row in torch's
    order (NaN above every number) and its index: position k - 1 of the keys' stable argsort. torch's
    quickselect returns any one of tied elements (of ``-0.0`` and ``0.0``, of NaNs); this returns one of them
    too, the first."""
    x, emit = importer.env[node.args[0]], importer.block_builder.emit
    k, dim, keepdim = node.args[1], _arg(node, 2, "dim", -1) % len(x.ty.shape), _arg(node, 3, "keepdim", False)
    order = emit(relax.op.argsort(_key(importer, x), dim, False, dtype="int64"))
    indices = emit(relax.op.strided_slice(order, [dim], [k - 1], [k]))
    return _kept(emit, emit(relax.op.gather_elements(x, indices, axis=dim)), indices, dim, keepdim)


def convert_nanmedian(node: torch.fx.Node, importer) -> relax.Var:
    """``nanmedian.dim(x, dim, keepdim=False)``: (values, indices), the lower median of each row's numbers
    (position ``(count - 1) // 2`` of the keys' stable argsort, NaN sorting last) and its index; a row of only
    NaN gives NaN (torch's index there, and among ties, is whichever its quickselect met; this gives the first
    in sorted order)."""
    x, emit = importer.env[node.args[0]], importer.block_builder.emit
    dim, keepdim = node.args[1] % len(x.ty.shape), _arg(node, 2, "keepdim", False)
    key = _key(importer, x)
    order = emit(relax.op.argsort(key, dim, False, dtype="int64"))
    if key is x:
        count = relax.const(int(x.ty.shape[dim]), "int64")
    else:
        numbers = emit(relax.op.not_equal(key, relax.const(_nan_key(str(x.ty.dtype)), str(key.ty.dtype))))
        count = emit(relax.op.sum(emit(relax.op.astype(numbers, "int64")), [dim], keepdims=True))
    middle = emit(relax.op.floor_divide(emit(relax.op.subtract(count, relax.const(1, "int64"))),
                                        relax.const(2, "int64")))
    middle = emit(relax.op.maximum(middle, relax.const(0, "int64")))
    if key is x:
        middle = emit(relax.op.broadcast_to(emit(relax.op.reshape(middle, [1] * len(x.ty.shape))),
                                            [1 if axis == dim else n for axis, n in enumerate(x.ty.shape)]))
    indices = emit(relax.op.gather_elements(order, middle, axis=dim))
    return _kept(emit, emit(relax.op.gather_elements(x, indices, axis=dim)), indices, dim, keepdim)


def cumulative_extremum(largest: bool):
    """Converter of ``cummax(x, dim)`` (``largest``) or ``cummin``: (values, indices) as torch's CPU kernel
    computes them: along the dim, an element at least as large (small) as the running extremum, or a NaN,
    replaces it unless it is a NaN already; so each index is the last one up to it whose key is the running
    extremum of the keys (NaN the largest key for cummax, the smallest for cummin), and the values are ``x``
    there. O(n^2) in the dim's size n: a running extremum and a last index, each a reduction over the prefix."""

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        x, emit = importer.env[node.args[0]], importer.block_builder.emit
        dim = node.args[1] % len(x.ty.shape)
        key = _key(importer, x, nan_largest=largest)
        indices = importer.block_builder.emit_te(_last_running_extremum, key, dim, largest,
                                                 primfunc_name_hint="cummax" if largest else "cummin")
        return emit(relax.Tuple([emit(relax.op.gather_elements(x, indices, axis=dim)), indices]))

    return convert


def _last_running_extremum(key: te.Tensor, dim: int, largest: bool) -> te.Tensor:
    """int64 tensor of ``key``'s shape: at each position along ``dim``, the last index up to it whose key is
    the largest (``largest``) or smallest key up to it."""
    extent, dtype = key.shape[dim], str(key.dtype)
    bound = tirx.min_value(dtype) if largest else tirx.max_value(dtype)
    reduce = te.max if largest else te.min

    def at(index, position):
        return key(*index[:dim], position, *index[dim + 1:])

    prefix = te.reduce_axis((0, extent), name="prefix")
    running = te.compute(key.shape, lambda *i: reduce(tirx.Select(prefix.var <= i[dim], at(i, prefix.var), bound),
                                                      axis=prefix), name="running_extremum")
    last = te.reduce_axis((0, extent), name="last")
    return te.compute(key.shape, lambda *i: te.max(
        tirx.Select(tirx.And(last.var <= i[dim], at(i, last.var) == running(*i)), last.var.astype("int64"),
                    tirx.const(-1, "int64")), axis=last), name="last_index")


def _nan_key(dtype: str) -> int:
    """NaN's key in ``order_key`` (``nan_largest``) for a float ``dtype``."""
    return (1 << (int(BITS[dtype][0].removeprefix("int")) - 1)) - 1


CONVERTERS = {
    "median.dim": convert_median,
    "nanmedian.dim": convert_nanmedian,
    "kthvalue.default": convert_kthvalue,
    "cummax.default": cumulative_extremum(largest=True),
    "cummin.default": cumulative_extremum(largest=False),
    "argmax.default": arg_extremum(largest=True),
    "argmin.default": arg_extremum(largest=False),
    "max.dim": extremum_with_index(largest=True),
    "min.dim": extremum_with_index(largest=False),
    "argsort.default": convert_argsort,
    "argsort.stable": convert_argsort,
    "sort.default": convert_sort,
    "sort.stable": convert_sort,
    "topk.default": convert_topk,
}
